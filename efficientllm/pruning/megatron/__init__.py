"""The pruning algorithm bound to megatron-core's model shards and optimizers.

groups (where each group lives in this rank's shards), saliency (per-shard accumulators),
hessian (the window's Hessians, residual energies and activation magnitudes), obs (an event's
OBS updates, each computed once per DP group), surgery (the model), optimizer_state (the
optimizer), and sync: the only module of pruning that runs collectives.
"""

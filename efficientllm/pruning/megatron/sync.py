"""The collectives of pruning, all of them: statistics are reduced only when a decision is taken.

- `global_score_table(acc)`: every group's score of every kind, layer and shard, identical on
  every rank, in the form `selection.select` consumes. One all-reduce of a flat fp64 vector
  over the world (each rank fills the slots it owns, zeros elsewhere), then a broadcast from
  rank 0 so that every rank holds the same bits:
  * head / kv_group / ffn: written by their owner TP rank on their PP stage, divided by the
    DP size (the DP average);
  * hidden: partial sums from every TP rank and PP stage (norms only from TP rank 0, where they
    are replicated), divided by the DP size;
  * layer: the mean over TP (sequence-parallel ranks see different tokens) and DP;
  * taylor scores of every kind are |·| of the summed signed EMA, taken here;
  * group_fisher hidden scores are complete on every rank (`sum_over_model_parallel` ran per
    step) and are written by TP rank 0 of the first PP stage only;
  * activation scores (Minitron) come from the window's DP-reduced activation magnitudes
    instead of the accumulators (`HessianCollector.activation_scores`); a KV group's k/v rows
    have no activation of their own and score 0, so a group is worth its heads.
- `reduce_window_over_dp(collector, ...)`: Hessians, residual energies and activation
  magnitudes summed over DP (over the global batch), and over TP where sequence parallelism
  split the tokens.
- `reduce_hessians_to_owners`, `share_from_owners`, `gather_over_dp`: an event's OBS
  (`obs.consumer_updates`): each compensated consumer's Hessian summed onto one DP rank, which
  factors it and broadcasts the small update to the others; fallback reasons gathered.
- `sum_over_model_parallel(partial)`: a hidden channel's per-step partial sums completed over
  TP and PP, for the group Fisher (`SaliencyAccumulator(hidden_sum=...)`).
- `sum_everywhere(flat)`: a small table summed over the world, the same bits on every rank
  (the score table; `obs.residual_factors`' share of each removal's error OBS leaves).
- `check_plan_identical(plan)`: the Plan's checksum compared across all ranks.
- `complete_reduce_scattered_grads(model)`: under megatron's distributed optimizer with DP > 1
  each rank's `main_grad` holds the DP-averaged gradient only in the shard of each grad-buffer
  bucket it owns (the rest is its own un-reduced gradient, which the optimizer never reads);
  the non-owned shards are zeroed and the buckets all-reduced over DP (disjoint shards: exact),
  so every DP rank scores the same averaged gradient as under the plain optimizer. One extra
  gradient-sized all-reduce per step while saliency is accumulated.
- `gather_over`, `exchange`, `gather_uneven`: the distributed optimizer's surgery (the owned
  ranges of every rank; the pieces of old state a rank's new ranges need from their old
  owners; the rounded corrected weights), each over the DP group and sending only what the
  receiver needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from efficientllm.config import SALIENCY_CRITERIA
from efficientllm.pruning.megatron.groups import ModuleKey as Key
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.saliency import SaliencyAccumulator
from efficientllm.pruning.plan import Plan


class PlanMismatch(RuntimeError):
    """Ranks computed different Plans: changing the model would desynchronise them."""


def _slots(arch):
    """Offsets of every group's slot in the flat table vector."""
    offsets, n = [], 0
    for w in arch.layers:
        head, n = n, n + w.num_attention_heads
        kv, n = n, n + w.num_query_groups
        ffn, n = n, n + w.ffn_hidden_size
        offsets.append((head, kv, ffn))
    hidden, n = n, n + arch.hidden_size
    layer, n = n, n + arch.num_layers
    return offsets, hidden, layer, n


def _local_scores(acc: SaliencyAccumulator, criterion: str, window: HessianCollector | None) -> tuple[dict, torch.Tensor]:
    """This rank's {layer: (head, kv_group, ffn)} scores of its groups and its partial sums of
    the hidden scores."""
    if criterion != "activation":
        layers = {l: (s[f"head_{criterion}"], s[f"kv_group_{criterion}"], s[f"ffn_{criterion}"])
                  for l, s in acc.stats.items()}
        if criterion != "group_fisher":
            return layers, acc.hidden_fisher if criterion == "fisher" else acc.hidden_taylor
        writer = acc.groups.tp_rank == 0 and parallel_state.get_pipeline_model_parallel_rank() == 0
        return layers, acc.hidden_group_fisher if writer else torch.zeros_like(acc.hidden_group_fisher)
    if window is None:
        raise ValueError("saliency criterion 'activation' needs the window's activations (window=...)")
    layers, hidden = {}, torch.zeros_like(acc.hidden_fisher)
    for local in acc.groups.layers:
        scores = window.activation_scores(local.layer)
        no_kv = torch.zeros(len(local.global_kv_groups), dtype=torch.float64, device=hidden.device)
        layers[local.layer] = (scores["head"], no_kv, scores["ffn"])
        if acc.groups.tp_rank == 0:  # the norm outputs are the same on every TP rank
            hidden += scores["hidden"]
    return layers, hidden


def global_score_table(acc: SaliencyAccumulator, criterion: str | None = None,
                       window: HessianCollector | None = None) -> dict:
    """{"head": [per layer [nh]], "kv_group": [[ng]], "ffn": [[f]], "hidden": [h], "layer": [L]}
    (fp64, on the CPU), for the kinds `acc` scores; identical on every rank. Call on every rank;
    for `criterion` "activation", after `reduce_window_over_dp(window)`."""
    criterion = criterion or acc.config.criterion
    if criterion not in SALIENCY_CRITERIA:
        raise ValueError(f"unknown saliency criterion {criterion!r}; valid: {', '.join(SALIENCY_CRITERIA)}")
    arch, groups = acc.arch, acc.groups
    dp = parallel_state.get_data_parallel_world_size()
    tp = groups.tp_size
    offsets, hidden_at, layer_at, total = _slots(arch)
    flat = torch.zeros(total, dtype=torch.float64, device=acc.hidden_fisher.device)
    layer_scores, hidden = _local_scores(acc, criterion, window)
    for local in groups.layers:
        head, kv, ffn = offsets[local.layer]
        heads, kvs, ffns = local.global_heads, local.global_kv_groups, local.global_ffn
        head_scores, kv_scores, ffn_scores = layer_scores[local.layer]
        flat[head + heads.start: head + heads.stop] = head_scores / dp
        flat[kv + kvs.start: kv + kvs.stop] = kv_scores / dp
        flat[ffn + ffns.start: ffn + ffns.stop] = ffn_scores / dp
        flat[layer_at + local.layer] = acc.stats[local.layer]["cos"] / (tp * dp)
    flat[hidden_at: hidden_at + arch.hidden_size] = hidden / dp
    sum_everywhere(flat)
    if criterion == "taylor":
        flat[:layer_at].abs_()
    flat = flat.cpu()  # cpu-ok: the selection ranks a few floats per group on the host
    table: dict = {}
    if "head" in acc.kinds:
        table["head"] = [flat[o[0]: o[0] + w.num_attention_heads].clone() for o, w in zip(offsets, arch.layers)]
        table["kv_group"] = [flat[o[1]: o[1] + w.num_query_groups].clone() for o, w in zip(offsets, arch.layers)]
    if "ffn" in acc.kinds:
        table["ffn"] = [flat[o[2]: o[2] + w.ffn_hidden_size].clone() for o, w in zip(offsets, arch.layers)]
    if "hidden" in acc.kinds:
        table["hidden"] = flat[hidden_at: hidden_at + arch.hidden_size].clone()
    if "layer" in acc.kinds:
        table["layer"] = flat[layer_at: layer_at + arch.num_layers].clone()
    return table


def sum_everywhere(flat: torch.Tensor) -> torch.Tensor:
    """`flat` summed in place over the world, then broadcast from rank 0, so that every rank
    holds the same bits whatever the reduction order."""
    dist.all_reduce(flat)
    dist.broadcast(flat, src=0)
    return flat


def reduce_window_over_dp(collector: HessianCollector, hessians: bool = True, energies: bool = True,
                          activations: bool = True) -> None:
    """Sum the local Hessians, the residual energies and the activation magnitudes (each when
    asked for) over DP, and over TP where sequence parallelism split the tokens. Call on every
    rank with the same arguments; modules are visited in the same order on DP replicas, and one
    a rank saw no tokens for is reduced as zeros. (An event reduces only the Hessians it reads,
    each onto one rank: `reduce_hessians_to_owners`.)"""
    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for key in sorted(collector.consumers if hessians else (), key=str):
        weight = collector.consumers[key].weight
        if key not in collector.hessians:
            collector.hessians[key] = torch.zeros(weight.shape[1], weight.shape[1], device=weight.device)
        over_tp = key in collector.partial_over_tp
        _sum_with_tokens(collector, key, collector.hessians[key], dp_group, tp_group if over_tp else None)
    for key in sorted(collector.norms if energies else (), key=str):
        weight = collector.norms[key].weight
        if key not in collector.energies:
            collector.energies[key] = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        _sum_with_tokens(collector, key, collector.energies[key], dp_group, tp_group)
    for key in sorted(collector.activation_inputs if activations else (), key=str):  # whole sequences over TP
        weight = collector.activation_inputs[key].weight
        if key not in collector.activations:
            collector.activations[key] = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(collector.activations[key], group=dp_group)


def _sum_with_tokens(collector: HessianCollector, key, value: torch.Tensor, dp_group, tp_group) -> None:
    tokens = torch.tensor([float(collector.tokens.get(key, 0))], dtype=torch.float64, device=value.device)
    for group in (dp_group, tp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
            dist.all_reduce(tokens, group=group)
    collector.tokens[key] = int(tokens.item())


def sum_over_model_parallel(partial: torch.Tensor) -> torch.Tensor:
    """`partial` summed in place over this rank's model-parallel group (its TP and PP ranks);
    DP replicas already hold the same DP-reduced gradients."""
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(partial, group=group)
    return partial


def check_plan_identical(plan: Plan, device: torch.device) -> None:
    """All-reduce the Plan's checksum as min and max; any difference is a hard error."""
    value = torch.tensor([plan.checksum(), -plan.checksum()], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    if value[0].item() != -value[1].item():
        raise PlanMismatch(
            f"pruning Plans differ across ranks (checksums {value[0].item()}..{-value[1].item()}); "
            "refusing to change the model"
        )


def grads_are_reduce_scattered(model) -> bool:
    """Whether `main_grad` is only reduce-scattered (distributed optimizer, DP > 1)."""
    ddp = getattr(model[0] if isinstance(model, (list, tuple)) else model, "ddp_config", None)
    return bool(ddp is not None and ddp.use_distributed_optimizer
                and parallel_state.get_data_parallel_world_size() > 1)


def complete_reduce_scattered_grads(model) -> None:
    """Make every rank's grad buffers hold the full DP-averaged gradient (module docstring)."""
    for chunk in (model if isinstance(model, (list, tuple)) else [model]):
        for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            group = buffer.data_parallel_group
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            if size == 1:
                continue
            for bucket in buffer.buckets:
                for r, shard in enumerate(shard_buffer(bucket.grad_data, size)):
                    if r != rank:
                        shard.zero_()
                dist.all_reduce(bucket.grad_data, group=group)


def reduce_hessians_to_owners(collector: HessianCollector, keys: list[Key]) -> dict[Key, int]:
    """Sum the Hessian of each consumer in `keys` over DP onto one DP rank, its owner (dealt in
    turn over the keys not yet summed: the j-th -> DP rank j % DP), after completing it over TP
    where sequence parallelism split the tokens; returns key -> owner. A key already summed
    (an earlier call in this window, recorded in `collector.owners`) keeps its owner and is not
    summed again. Only the owner's copy is then the sum (its token count is not reduced: OBS
    does not read it). Call on every rank with the same keys."""
    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp, ranks = dist.get_world_size(dp_group), dist.get_process_group_ranks(dp_group)
    for j, key in enumerate(key for key in keys if key not in collector.owners):
        weight = collector.consumers[key].weight
        if key not in collector.hessians:
            collector.hessians[key] = torch.zeros(weight.shape[1], weight.shape[1], device=weight.device)
        hessian = collector.hessians[key]
        if key in collector.partial_over_tp and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(hessian, group=tp_group)
        collector.owners[key] = j % dp
        if dp > 1:
            dist.reduce(hessian, dst=ranks[collector.owners[key]], group=dp_group)
    return {key: collector.owners[key] for key in keys}


def share_from_owners(values: dict[Key, torch.Tensor], owners: dict[Key, int], sizes: dict[Key, int],
                      dtype: torch.dtype, device: torch.device) -> dict[Key, torch.Tensor]:
    """Every key's flat tensor (`sizes[key]` elements), held by its owner DP rank (`values`:
    this rank's own), on every DP rank: one broadcast from each owner."""
    dp_group = parallel_state.get_data_parallel_group()
    me, ranks = dist.get_rank(dp_group), dist.get_process_group_ranks(dp_group)
    out = {}
    for owner in range(len(ranks)):
        keys = [key for key in owners if owners[key] == owner]
        if not keys:
            continue
        if owner == me:
            flat = torch.cat([values[key].reshape(-1).to(dtype) for key in keys])
        else:
            flat = torch.empty(sum(sizes[key] for key in keys), dtype=dtype, device=device)
        if len(ranks) > 1:
            dist.broadcast(flat, src=ranks[owner], group=dp_group)
        out.update(zip(keys, flat.split([sizes[key] for key in keys])))
    return out


def gather_over_dp(obj):
    """Every DP rank's (small, picklable) `obj`, in DP-rank order."""
    dp_group = parallel_state.get_data_parallel_group()
    out = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(out, obj, group=dp_group)
    return out


def data_parallel_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def group_rank(group) -> int:
    return dist.get_rank(group)


def gather_over(value: torch.Tensor, group) -> list[torch.Tensor]:
    """Every group rank's `value` (same shape everywhere), in group-rank order."""
    if dist.get_world_size(group) == 1:
        return [value]
    out = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, value, group=group)
    return out


def exchange(sends: list[torch.Tensor], receive_sizes: list[int], group) -> list[torch.Tensor]:
    """One all-to-all: `sends[r]` goes to group rank r, and `receive_sizes[r]` elements come
    back from it (this rank's own entries are neither sent nor received: they stay here).
    Flat tensors of one dtype; every rank calls it, also with nothing to send."""
    me, size = dist.get_rank(group), dist.get_world_size(group)
    if size == 1:
        return [sends[0][:0]]
    reference = sends[me]
    send_sizes = [0 if r == me else sends[r].numel() for r in range(size)]
    receive_sizes = [0 if r == me else receive_sizes[r] for r in range(size)]
    outgoing = torch.cat([sends[r] for r in range(size) if r != me])
    incoming = torch.empty(sum(receive_sizes), dtype=reference.dtype, device=reference.device)
    dist.all_to_all_single(incoming, outgoing, receive_sizes, send_sizes, group=group)
    return list(torch.split(incoming, receive_sizes))


def gather_uneven(value: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """Every group rank's flat `value`, where rank r's has `sizes[r]` elements (known to all)."""
    if dist.get_world_size(group) == 1:
        return [value]
    padded = torch.zeros(max(sizes), dtype=value.dtype, device=value.device)
    padded[: value.numel()] = value
    return [v[:n] for v, n in zip(gather_over(padded, group), sizes)]


def group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


"""After the last pruning event: the model for the continued pretraining.

Pruning edits the local spec, where every norm and linear is its own module; Transformer
Engine fuses each norm into the linear after it (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`), so TE cannot be pruned here. With
`model.transformer_impl_after_pruning` set, the shapes are final after step `prune.end_step`:
the trainer writes a checkpoint there and rebuilds the pruned Architecture with that spec
(`transformer_engine`, or `local` again), loading weights, Adam state, LR schedule and RNG from
that checkpoint, and drops the pruning statistics. The local -> TE name mapping is megatron-
core's own: the local heterogeneous spec stores its norms under the TE names
(`sharded_state_dict_keys_map`), so a TE model loads a local checkpoint like its own. A run
resumed after that step builds the model with that spec directly.
"""

from __future__ import annotations

from typing import Any

from efficientllm.architecture import Architecture
from efficientllm.config import Config
from efficientllm.model import rebuilds_after_pruning


def rebuild_due(config: Config, step: int) -> bool:
    """Rebuild right after the step that ends the pruning phase, if training goes on."""
    return rebuilds_after_pruning(config) and step == config.prune.end_step < config.training.train_iters


class FinishedPruning:
    """The record of a finished pruning phase, checkpointed in place of the pruning pass once
    the model is rebuilt (on TE there are no separate norms to score): the events' Plans and
    the summary `efficientllm inspect` shows. It holds no statistics and takes no part in the
    loop (the trainer has no pruning pass any more)."""

    def __init__(self, source: Architecture, summary: dict[str, Any] | None = None,
                 plans: list[dict[str, Any]] | None = None):
        self.source = source
        self.plans = list(plans or [])
        self._summary = dict(summary or {})

    def state_dict(self) -> dict[str, Any]:
        return {"plans": self.plans}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plans = list(state["plans"])

    def local_state_dict(self) -> dict[str, Any]:
        return {}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """The saliency statistics of a finished phase are never read again."""

    def summary(self) -> dict[str, Any]:
        return {**self._summary, "events": len(self.plans)}

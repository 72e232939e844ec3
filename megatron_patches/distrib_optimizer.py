"""Distributed-optimizer checkpoint load with torch Adam (no apex / Transformer Engine).

Written for megatron-core 0.16.x. Without apex or TE, megatron falls back to torch Adam/AdamW,
whose per-parameter state carries a `step` tensor that megatron's load path does not expect:

1. `DistributedOptimizer.load_state_dict` writes ONE `step` tensor into the state of every
   parameter. torch's Adam increments `state["step"]` in place once per parameter, so after a
   resume the shared counter advances by the number of parameters per iteration: the bias
   correction is wrong and the loss silently drifts from the uninterrupted run. Fixed by
   cloning the step per parameter right after that load.
2. `_set_main_param_and_optimizer_states` copies every state key from the loaded tensors, but
   the loaded parameter state leaves out `step` (it travels in the param groups), so the load
   fails with `KeyError: 'step'`. Fixed by leaving `step` (already set from the param groups)
   as it is.
"""

from __future__ import annotations

import functools
from typing import Any


def _clone_shared_steps(inner_optimizer: Any) -> None:
    for state in inner_optimizer.state.values():
        step = state.get("step")
        if step is not None and hasattr(step, "clone"):
            state["step"] = step.detach().clone()


def apply() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer.load_state_dict, "_clones_step_per_param", False):
        return
    original_load = DistributedOptimizer.load_state_dict
    original_set = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original_load)
    def load_state_dict(self: Any, state_dict: Any) -> None:
        original_load(self, state_dict)
        _clone_shared_steps(self.optimizer)

    @functools.wraps(original_set)
    def set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        original_set(self, model_param, tensors)

    load_state_dict._clones_step_per_param = True
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states


def owned_param_range(optimizer: Any, model_param: Any) -> Any:
    """The `Range` of the flattened `model_param` whose main param and Adam state this DP rank
    owns in megatron's DistributedOptimizer (`.start`, `.end`; empty when it owns none).

    megatron-core 0.16 exposes this only as the private `_get_model_param_range_map`; optimizer
    surgery needs it, and a guard test fails if its name or result changes."""
    return optimizer._get_model_param_range_map(model_param)["param"]

"""Local Hessians of the consumer matrices: H = Σ XᵀX (fp32) over their local inputs.

Consumers (the matrices compensated when an input structure is removed):
- `layers.{l}.linear_proj`: input = attention output of this rank's heads ([nh_local*d]);
- `layers.{l}.linear_fc2`: input = this rank's FFN activations ([f_local]);
- `layers.{l}.linear_qkv`, `layers.{l}.linear_fc1`, `output_layer`: the post-norm hidden
  input ([h], replicated over TP; with sequence parallelism each TP rank sees its own tokens,
  so these are partial sums over TP, listed in `partial_over_tp`).

Forward pre-hooks are registered only while a window is open (`open_window()` …
`close_window()`), on training forwards, so outside the window a step costs nothing extra.
Damping happens where H is used (compensation), not here.
"""

from __future__ import annotations

from typing import Any

import torch

from efficientllm.architecture import Architecture
from efficientllm.pruning.groups import shard_groups


class HessianCollector:
    def __init__(self, model, arch: Architecture):
        groups = shard_groups(model, arch)
        self.consumers: dict[str, torch.nn.Module] = {}
        for local in groups.layers:
            attn, mlp = local.module.self_attention, local.module.mlp
            l = local.layer
            self.consumers[f"layers.{l}.linear_qkv"] = attn.linear_qkv
            self.consumers[f"layers.{l}.linear_proj"] = attn.linear_proj
            self.consumers[f"layers.{l}.linear_fc1"] = mlp.linear_fc1
            self.consumers[f"layers.{l}.linear_fc2"] = mlp.linear_fc2
        for gpt in groups.chunks:
            if getattr(gpt, "post_process", False):
                self.consumers["output_layer"] = gpt.output_layer
        sequence_parallel = any(getattr(g.config, "sequence_parallel", False) for g in groups.chunks)
        hidden_side = ("linear_qkv", "linear_fc1", "output_layer")
        self.partial_over_tp = {
            name for name in self.consumers if sequence_parallel and name.endswith(hidden_side)
        }
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._hooks: list[Any] = []

    @property
    def is_open(self) -> bool:
        return bool(self._hooks)

    def open_window(self) -> None:
        """Start (or continue) collecting: registers the forward pre-hooks."""
        if self.is_open:
            return
        for name, module in self.consumers.items():
            self._hooks.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def close_window(self) -> None:
        """Stop collecting (the Hessians are kept until `reset()`)."""
        self.remove()

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def reset(self) -> None:
        self.hessians.clear()
        self.tokens.clear()

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            if not module.training:
                return
            x = args[0] if args else kwargs["input_"]
            with torch.no_grad():
                x = x.detach().reshape(-1, x.shape[-1]).float()
                h = self.hessians.get(name)
                if h is None:
                    h = self.hessians[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32)
                h.addmm_(x.T, x)
                self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def state_dict(self) -> dict[str, Any]:
        return {"hessians": {k: v.clone() for k, v in self.hessians.items()}, "tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state["hessians"]) - set(self.consumers)
        if unknown:
            raise ValueError(f"hessian state names consumers not on this rank: {sorted(unknown)}")
        self.hessians = {k: v.clone() for k, v in state["hessians"].items()}
        self.tokens = dict(state["tokens"])

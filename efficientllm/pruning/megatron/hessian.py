"""What a pruning event's compensation needs from the batches just before it, collected by
forward pre-hooks on this rank's modules while a window is open (`open_window()` …
`close_window()`), on training forwards only, so outside the window a step costs nothing extra.

- Local Hessians H = Σ XᵀX (fp32) of the consumer matrices, keyed (layer, consumer):
  * (l, "linear_proj"): input = attention output of this rank's heads ([nh_local*d]);
  * (l, "linear_fc2"): input = this rank's FFN activations ([f_local]);
  * (l, "linear_qkv"), (l, "linear_fc1"), (None, "output_layer"): the post-norm hidden input
    ([h], replicated over TP). A tied output layer is the embedding, which is not compensated
    (its two copies must stay identical), so it has no Hessian.
- Residual energies E = Σ_t x_t² per channel (fp64) of every RMSNorm's input, keyed
  (l, "input_layernorm"), (l, "pre_mlp_layernorm"), (None, "final_layernorm"): what the norm
  rescale after a hidden removal is computed from (`pruning/norms.py`). Only when asked for.
- Activation magnitudes (`saliency.criterion: activation`, NVIDIA's Minitron as ModelOpt's
  `mcore_minitron` computes it) of the inputs of linear_proj (attention output per head),
  linear_fc2 (FFN activations) and linear_qkv / linear_fc1 (the two norm outputs of a layer):
  per channel A = Σ_sequences (mean over the sequence's tokens of |x|)², fp64. The score is √A
  (L2 over the calibration sequences of the per-sequence mean |x|): a head's is the L2 norm of
  its d channels' scores, a hidden channel's the sum of its scores at the layers' norm outputs.
  Only when asked for.

With sequence parallelism each TP rank sees its own tokens, so the hidden-side Hessians are
partial sums over TP (`partial_over_tp`); `sync.reduce_window_over_dp` completes them, and sums
the energies over TP always (so every TP rank computes the same norm factor from the same bits).
A sequence's mean |x| is not a sum over tokens, so there each micro-batch's per-sequence sums
are added over TP in the hook (`_sum_over_tensor_parallel`) before they are squared.
Damping happens where H is used (compensation), not here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from efficientllm.architecture import Architecture
from efficientllm.pruning.megatron.groups import ModuleKey as Key
from efficientllm.pruning.megatron.groups import shard_groups
from efficientllm.pruning.norms import rms_rescale


class HessianCollector:
    """One window's statistics on this rank: the consumers' Hessians (`hessians=True`) and the
    norms' input energies (`energies=True`), each with its token count, and the activation
    magnitudes (`activations=True`)."""

    def __init__(self, model, arch: Architecture, hessians: bool = True, energies: bool = False,
                 activations: bool = False):
        groups = shard_groups(model, arch)
        self.head_dim, self.tp_size = arch.head_dim, groups.tp_size
        self.consumers: dict[Key, torch.nn.Module] = {}  # those with a Hessian
        self.activation_inputs: dict[Key, torch.nn.Module] = {}
        self.norms: dict[Key, torch.nn.Module] = {}
        for local in groups.layers:
            block, l = local.module, local.layer
            attn, mlp = block.self_attention, block.mlp
            for name, module in (("linear_qkv", attn.linear_qkv), ("linear_proj", attn.linear_proj),
                                 ("linear_fc1", mlp.linear_fc1), ("linear_fc2", mlp.linear_fc2)):
                if hessians:
                    self.consumers[(l, name)] = module
                if activations:
                    self.activation_inputs[(l, name)] = module
            if energies:
                self.norms[(l, "input_layernorm")] = block.input_layernorm
                self.norms[(l, "pre_mlp_layernorm")] = block.pre_mlp_layernorm
        for gpt in groups.chunks:
            if getattr(gpt, "post_process", False):
                if hessians and not arch.tie_embeddings:
                    self.consumers[(None, "output_layer")] = gpt.output_layer
                final = getattr(gpt.decoder, "final_layernorm", None)
                if energies and final is not None:
                    self.norms[(None, "final_layernorm")] = final
        sequence_parallel = any(getattr(g.config, "sequence_parallel", False) for g in groups.chunks)
        hidden_side = ("linear_qkv", "linear_fc1", "output_layer")
        inputs = {**self.consumers, **self.activation_inputs}
        self.partial_over_tp = {key for key in inputs if sequence_parallel and key[1] in hidden_side}
        self.hessians: dict[Key, torch.Tensor] = {}
        self.energies: dict[Key, torch.Tensor] = {}
        self.activations: dict[Key, torch.Tensor] = {}
        self.tokens: dict[Key, int] = {}
        # The owner DP rank of every Hessian already summed onto it (`sync.reduce_hessians_to_owners`).
        self.owners: dict[Key, int] = {}
        self._hooks: list[Any] = []

    @property
    def is_open(self) -> bool:
        return bool(self._hooks)

    def open_window(self) -> None:
        """Start (or continue) collecting: registers the forward pre-hooks."""
        if self.is_open:
            return
        for key, module in {**self.consumers, **self.activation_inputs}.items():
            self._hooks.append(module.register_forward_pre_hook(self._input_hook(key), with_kwargs=True))
        for key, module in self.norms.items():
            self._hooks.append(module.register_forward_pre_hook(self._energy_hook(key), with_kwargs=True))

    def close_window(self) -> None:
        """Stop collecting (what was collected is kept until `reset()`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def reset(self) -> None:
        self.hessians.clear()
        self.energies.clear()
        self.activations.clear()
        self.tokens.clear()
        self.owners.clear()

    def _count(self, key: Key, tokens: int) -> None:
        self.tokens[key] = self.tokens.get(key, 0) + tokens

    def _input_hook(self, key: Key):
        hessian, activation = key in self.consumers, key in self.activation_inputs

        def hook(module, args, kwargs):
            if not module.training:
                return
            x = (args[0] if args else kwargs["input_"]).detach()  # [sequence, batch, width]
            with torch.no_grad():
                if activation:
                    self._add_activation(key, x)
                x = x.reshape(-1, x.shape[-1]).float()
                if hessian:
                    h = self.hessians.get(key)
                    if h is None:
                        h = self.hessians[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                    h.addmm_(x.T, x)
                    self._count(key, x.shape[0])

        return hook

    def _add_activation(self, key: Key, x: torch.Tensor) -> None:
        """Fold one micro-batch into Σ_sequences (mean over the sequence of |x|)² per channel."""
        sums = x.abs().sum(0, dtype=torch.float64)  # [batch, width]: per sequence
        length = x.shape[0]
        if key in self.partial_over_tp:  # this rank holds a slice of every sequence
            _sum_over_tensor_parallel(sums)
            length *= self.tp_size
        value = (sums / length).square().sum(0)
        if key in self.activations:
            self.activations[key].add_(value)
        else:
            self.activations[key] = value

    def activation_scores(self, layer: int) -> dict[str, torch.Tensor]:
        """Minitron's importance of this rank's groups of `layer`, from the (DP-reduced) window:
        "head" per local head (L2 over its d channels), "ffn" per local channel, "hidden" per
        channel (summed over the layer's two norm outputs)."""
        missing = [name for name in ("linear_proj", "linear_fc2", "linear_qkv", "linear_fc1")
                   if (layer, name) not in self.activations]
        if missing:
            raise RuntimeError(f"activation saliency: the window saw no input of layer {layer}'s {missing[0]}; "
                               f"it needs saliency.hessian_window >= 1 training batches before the event")
        score = lambda name: self.activations[(layer, name)].sqrt()
        heads = self.activations[(layer, "linear_proj")].view(-1, self.head_dim).sum(1).sqrt()
        return {"head": heads, "ffn": score("linear_fc2"), "hidden": score("linear_qkv") + score("linear_fc1")}

    def _energy_hook(self, key: Key):
        def hook(module, args, kwargs):
            if not module.training:
                return
            with torch.no_grad():
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                e = x.float().square().sum(0, dtype=torch.float64)
                if key in self.energies:
                    self.energies[key].add_(e)
                else:
                    self.energies[key] = e
                self._count(key, x.shape[0])

        return hook

    def norm_scales(self, width: int, keep: torch.Tensor) -> dict[Key, float]:
        """The rescale of every norm on this rank when `keep` of `width` hidden channels survive,
        from this window's (reduced) energies."""
        return {key: rms_rescale(width, keep, self.energies.get(key), self.tokens.get(key, 0), norm.eps)
                for key, norm in self.norms.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"hessians": {k: v.clone() for k, v in self.hessians.items()},
                "energies": {k: v.clone() for k, v in self.energies.items()},
                "activations": {k: v.clone() for k, v in self.activations.items()},
                "tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        activations = state.get("activations", {})  # absent in older checkpoints
        unknown = ((set(state["hessians"]) - set(self.consumers)) | (set(state["energies"]) - set(self.norms))
                   | (set(activations) - set(self.activation_inputs)))
        if unknown:
            raise ValueError(f"window state names modules not on this rank: {sorted(unknown, key=str)}")
        self.hessians = {k: v.clone() for k, v in state["hessians"].items()}
        self.energies = {k: v.clone() for k, v in state["energies"].items()}
        self.activations = {k: v.clone() for k, v in activations.items()}
        self.tokens = dict(state["tokens"])


def _sum_over_tensor_parallel(values: torch.Tensor) -> torch.Tensor:
    """Sum over this rank's TP group, in place (inside a forward, which every TP rank runs)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values

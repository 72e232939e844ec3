"""Structured-pruning surgery of the model: shrink this rank's shards by a Plan.

Every rank runs the same code with the same Plan on its own shards; there are no collectives
here. The new model is built from `plan.apply(old_arch)` with `build_model_chunks` without
random initialisation (every value is copied in; megatron's tensor-parallel attributes, which its
init sets, are copied from the old parameters), and every new parameter receives the slice of the
old local shard that survives:

- `linear_qkv`  rows  = kept query heads / KV groups of this TP rank; columns = kept hidden
- `linear_proj` rows  = kept hidden;                                  columns = kept heads
- `linear_fc1`  rows  = kept gate rows then kept up rows;             columns = kept hidden
- `linear_fc2`  rows  = kept hidden;                                  columns = kept channels
- norm weights, embedding columns, output-layer columns: kept hidden (vocab rows untouched)

Corrections, all computed in fp32 or better from the old *master* weights (the optimizer's fp32
main params under mixed precision, else the weights themselves) and only then rounded into the
model's dtype, so a bf16 model loses nothing beyond that one rounding:
- structured OBS on the consumers of removed inputs (`compensation`: their local Hessians),
  except a tied output layer, which is sliced like the embedding it shares;
- after a hidden removal every RMSNorm weight is multiplied by its `norm_scales` factor
  (`pruning/norms.py`), so the kept post-norm activations keep their expected scale, which is
  what the hidden-side OBS (of `linear_qkv`, `linear_fc1`, the output layer) assumes.
Both are row-local (a new row is computed from its old row alone; `ParamSlice.rows_value`), so
the distributed optimizer's surgery applies them to just the rows of its own shard
(`optimizer_state`).

Removed whole layers (`plan.layers`) are supported when this rank holds the whole model
(PP = 1, no virtual stages); moving layers between pipeline stages is not done here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

from efficientllm.architecture import Architecture
from efficientllm.model import ModelOptions, build_model_chunks
from efficientllm.pruning.compensation import ObsUpdate, obs_update
from efficientllm.pruning.layout import LayerLayout, complement, kept_hidden
from efficientllm.pruning.megatron.groups import ModuleKey as Key
from efficientllm.pruning.megatron.groups import as_chunks
from efficientllm.pruning.plan import Plan

# Consumers whose input columns a Plan removes, and the norms in front of the hidden-side ones.
CONSUMERS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
NORMS = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")


class SurgeryError(RuntimeError):
    """The model or optimizer cannot be sliced the way the Plan asks."""


@dataclass
class ParamSlice:
    """One surviving parameter: new = old[rows][:, cols] (None = all), corrected by `obs`
    (a compensated consumer: its columns are `obs.keep` = `cols`) and `scale` (a rescaled norm)."""

    name: str  # name inside the new chunk
    old: torch.nn.Parameter
    new: torch.nn.Parameter
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    layer: int | None  # global layer index in the old Architecture (None outside the decoder)
    consumer: str | None  # short module name when the columns are a compensable consumer's inputs
    norm: str | None = None  # short module name of an RMSNorm weight
    obs: ObsUpdate | None = None  # set by prune_model
    scale: float | None = None  # set by prune_model

    @property
    def key(self) -> Key:
        return (self.layer, self.consumer or self.norm or "")

    @property
    def corrected(self) -> bool:
        """Whether the new value is more than a slice of the old one."""
        return self.obs is not None or self.scale is not None

    def old_rows(self, new_rows: range) -> range:
        """The old rows that `new_rows` (a range of the new parameter's rows) come from."""
        if self.rows is None:
            return new_rows
        if not new_rows:
            return range(0)
        low, high = torch.aminmax(self.rows[new_rows.start: new_rows.stop])
        return range(int(low), int(high) + 1)

    def rows_value(self, block: torch.Tensor, first: int, new_rows: range, corrected: bool = True) -> torch.Tensor:
        """New rows `new_rows` from `block`, the old rows first .. first + len(block) - 1 of a
        tensor shaped like the old parameter (its value or, with `corrected=False`, an optimizer
        moment: only sliced). Row-local, so any block that holds `old_rows(new_rows)` will do."""
        if self.rows is None:
            out = block[new_rows.start - first: new_rows.stop - first]
        else:
            local = self.rows[new_rows.start: new_rows.stop] - first
            out = block.index_select(0, local.to(block.device))
        if corrected and self.obs is not None:
            out = self.obs.apply(out).to(block.dtype)
        elif self.cols is not None:
            out = out.index_select(1, self.cols.to(block.device))
        if corrected and self.scale is not None:
            out = out * self.scale
        return out.contiguous()

    def take(self, tensor: torch.Tensor, corrected: bool = False) -> torch.Tensor:
        """The surviving slice of a tensor shaped like the old parameter (with `corrected`,
        also compensated and rescaled: the new value)."""
        if tuple(tensor.shape) != tuple(self.old.shape):
            raise SurgeryError(
                f"{self.name}: tensor {tuple(tensor.shape)} is not shaped like the parameter "
                f"{tuple(self.old.shape)}"
            )
        out = self.rows_value(tensor, 0, range(self.new.shape[0]), corrected)
        if tuple(out.shape) != tuple(self.new.shape):
            raise SurgeryError(
                f"{self.name}: the surviving slice {tuple(out.shape)} does not match the new "
                f"parameter {tuple(self.new.shape)}"
            )
        return out


def _kept_layers(plan: Plan, arch: Architecture) -> list[int]:
    return [l for l in range(arch.num_layers) if l not in plan.layers]


def _chunk_layer_numbers(chunk: torch.nn.Module) -> list[int]:
    """Global 0-based layer indices of a GPTModel chunk's decoder layers, in local order."""
    return [layer.layer_number - 1 for layer in chunk.decoder.layers]


def param_slices(
    old_chunks: list[torch.nn.Module],
    new_chunks: list[torch.nn.Module],
    plan: Plan,
    old_arch: Architecture,
    tp_rank: int | None = None,
    tp_size: int | None = None,
) -> list[ParamSlice]:
    """Pair every parameter of the new chunks with the old local shard slice it inherits."""
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    old_chunks, new_chunks = as_chunks(old_chunks), as_chunks(new_chunks)
    if len(old_chunks) != len(new_chunks):
        raise SurgeryError(f"{len(old_chunks)} old chunks but {len(new_chunks)} new chunks")
    kept_layers = _kept_layers(plan, old_arch)
    if plan.layers:
        if len(old_chunks) != 1 or not (old_chunks[0].pre_process and old_chunks[0].post_process):
            raise NotImplementedError(
                "removing whole layers is only supported when one rank holds the whole model "
                "(PP = 1, no virtual pipeline stages)"
            )
    hidden = kept_hidden(old_arch, plan.hidden) if plan.hidden else None
    inputs = compensated_inputs(plan, old_arch, tp_rank, tp_size)
    slices: list[ParamSlice] = []
    layouts: dict[int, LayerLayout] = {}

    def layout(layer: int) -> LayerLayout:
        if layer not in layouts:
            layouts[layer] = LayerLayout.of(old_arch, layer, tp_size)
        return layouts[layer]

    for old_chunk, new_chunk in zip(old_chunks, new_chunks):
        old_layers = _chunk_layer_numbers(old_chunk)
        new_layers = _chunk_layer_numbers(new_chunk)
        # new global index j comes from old global index kept_layers[j]
        old_local = {g: i for i, g in enumerate(old_layers)}
        new_to_old_local = {}
        for i, g in enumerate(new_layers):
            source = kept_layers[g]
            if source not in old_local:
                raise NotImplementedError(
                    f"new layer {g} comes from old layer {source}, which another pipeline "
                    "stage holds"
                )
            new_to_old_local[i] = (old_local[source], source)
        old_params = dict(old_chunk.named_parameters())
        for name, new in new_chunk.named_parameters():
            parts = name.split(".")
            layer = None
            old_name = name
            if parts[:2] == ["decoder", "layers"]:
                local, layer = new_to_old_local[int(parts[2])]
                old_name = ".".join(parts[:2] + [str(local)] + parts[3:])
            if old_name not in old_params:
                raise SurgeryError(f"new parameter {name} has no counterpart {old_name} in the old model")
            old = old_params[old_name]
            module = parts[-2] if len(parts) >= 2 else ""
            rows = cols = None
            consumer = norm = None
            if parts[-1] != "weight":
                if tuple(old.shape) != tuple(new.shape):
                    raise SurgeryError(f"don't know how to slice {name} {tuple(old.shape)}")
            elif module == "word_embeddings":
                cols = hidden
            elif module == "output_layer":
                # A tied copy of the embedding is only sliced, like the embedding itself: the
                # two copies (first and last pipeline stage) must stay identical.
                cols, consumer = hidden, None if old_arch.tie_embeddings else "output_layer"
            elif module in NORMS:
                rows, norm = hidden, module
            elif module in CONSUMERS:  # the output layer is above
                heads, channels = plan.removed_heads(layer), plan.removed_ffn(layer)
                if module == "linear_qkv":
                    rows = layout(layer).kept_qkv_rows(tp_rank, heads) if heads else None
                elif module == "linear_fc1":
                    rows = layout(layer).kept_fc1_rows(tp_rank, channels) if channels else None
                else:  # row-parallel: its output rows are hidden channels
                    rows = hidden
                cols, consumer = inputs.get((layer, module)), module
            elif tuple(old.shape) != tuple(new.shape):
                raise SurgeryError(f"don't know how to slice {name} {tuple(old.shape)}")
            slices.append(ParamSlice(name, old, new, rows, cols, layer, consumer, norm))
    return slices


@dataclass
class PrunedModel:
    """The outcome of `prune_model`."""

    chunks: list[torch.nn.Module]  # unwrapped GPTModel chunks of `plan.apply(old_arch)`
    slices: list[ParamSlice]  # every new parameter, its old one and its corrections
    # id(new param) -> its exact fp32 value, for params stored in a lower precision when the
    # old fp32 masters were given: what the optimizer's new main param must start from
    # (`optimizer_state.slice_optimizer_state`).
    masters: dict[int, torch.Tensor] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # consumers only sliced, and why


def _set_corrections(s: ParamSlice, compensation: Mapping[Key, torch.Tensor | ObsUpdate],
                     norm_scales: Mapping[Key, float], damping: float, fallbacks: list[str]) -> None:
    """Attach to `s` the OBS update of a compensated consumer and the factor of a rescaled norm."""
    given = compensation.get(s.key) if s.consumer is not None and s.cols is not None else None
    if isinstance(given, ObsUpdate):
        s.obs = given
    elif given is not None:
        removed = complement(s.old.shape[1], s.cols)
        s.obs, reason = obs_update(given.to(s.old.device), removed, damping)
        if reason is not None:
            fallbacks.append(f"{s.name}: {reason}")
    if s.norm is not None and s.key in norm_scales:
        s.scale = norm_scales[s.key]


def compensated_inputs(plan: Plan, arch: Architecture, tp_rank: int | None = None,
                       tp_size: int | None = None) -> dict[Key, torch.Tensor]:
    """(old layer, consumer) -> its kept input columns in this rank's shard, for every consumer
    whose inputs `plan` removes: those an event compensates, whose Hessians it reads. Layers
    it removes whole have none; neither has a tied output layer (only sliced, like the
    embedding it is)."""
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out: dict[Key, torch.Tensor] = {}
    for l in _kept_layers(plan, arch):
        layout = LayerLayout.of(arch, l, tp_size)
        if plan.removed_heads(l):
            out[(l, "linear_proj")] = layout.kept_proj_columns(tp_rank, plan.removed_heads(l))
        if plan.removed_ffn(l):
            out[(l, "linear_fc2")] = layout.kept_fc2_columns(tp_rank, plan.removed_ffn(l))
        if plan.hidden:
            out[(l, "linear_qkv")] = out[(l, "linear_fc1")] = kept_hidden(arch, plan.hidden)
    if plan.hidden and not arch.tie_embeddings:
        out[(None, "output_layer")] = kept_hidden(arch, plan.hidden)
    return out


@torch.no_grad()
def prune_model(
    old_chunks: list[torch.nn.Module],
    plan: Plan,
    old_arch: Architecture,
    options: ModelOptions,
    compensation: Mapping[Key, torch.Tensor | ObsUpdate] | None = None,
    damping: float = 0.01,
    norm_scales: Mapping[Key, float] | None = None,
    masters: Mapping[int, torch.Tensor] | None = None,
) -> PrunedModel:
    """New (unwrapped) GPTModel chunks for `plan.apply(old_arch)` holding the surviving, corrected
    slices of this rank's old shards (see the module docstring).

    `compensation` maps (old global layer, consumer) -> the consumer's rank-local input Hessian
    ("linear_proj" / "linear_fc2" for head / ffn removals, "linear_qkv" / "linear_fc1" and
    (None, "output_layer") for hidden removals; `compensated_inputs`), or the OBS update already
    computed from it (`obs.consumer_updates`); consumers without one are sliced. `norm_scales`
    maps (old global layer or None, norm name) -> the factor for that RMSNorm's weight.
    `masters` maps id(old param) -> its fp32 master where the optimizer keeps a whole one (a
    sharded one is completed by `optimizer_state.slice_optimizer_state`). The global RNG state
    is left as it was."""
    new_arch = plan.apply(old_arch)
    compensation, norm_scales, masters = compensation or {}, norm_scales or {}, masters or {}
    rng = torch.random.get_rng_state()
    try:
        new_chunks = build_model_chunks(new_arch, options, initialize=False)
    finally:
        torch.random.set_rng_state(rng)
    result = PrunedModel(new_chunks, param_slices(old_chunks, new_chunks, plan, old_arch))
    for s in result.slices:
        copy_tensor_model_parallel_attributes(s.new, s.old)
        _set_corrections(s, compensation, norm_scales, damping, result.fallbacks)
        master = masters.get(id(s.old))
        value = s.take(master if master is not None else s.old.detach().float(), corrected=True)
        s.new.data.copy_(value)
        if master is not None and s.new.dtype != torch.float32:
            result.masters[id(s.new)] = value
    for old, new in zip(as_chunks(old_chunks), new_chunks):
        new.train(old.training)
    return result


@torch.no_grad()
def mask_model(chunks: list[torch.nn.Module], plan: Plan, arch: Architecture) -> None:
    """Zero, in place, the head / ffn groups and whole layers the Plan removes in this rank's
    shards (Q rows + proj columns; gate/up rows + fc2 columns; proj and fc2 of a layer), so the
    model computes what the physically pruned one does. Hidden channels are not masked (that is
    not equivalent under RMSNorm)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in as_chunks(chunks):
        for layer_module in chunk.decoder.layers:
            l = layer_module.layer_number - 1
            attn, mlp = layer_module.self_attention, layer_module.mlp
            if l in plan.layers:
                attn.linear_proj.weight.zero_()
                mlp.linear_fc2.weight.zero_()
                continue
            layout = LayerLayout.of(arch, l, tp_size)
            for head in plan.removed_heads(l):
                if layout.rank_of_head(head) == tp_rank:
                    attn.linear_qkv.weight[layout.qkv_query_rows(head)] = 0
                    attn.linear_proj.weight[:, layout.proj_columns(head)] = 0
            for c in plan.removed_ffn(l):
                if layout.rank_of_ffn(c) == tp_rank:
                    mlp.linear_fc1.weight[layout.fc1_rows(c)] = 0
                    mlp.linear_fc2.weight[:, layout.fc2_column(c)] = 0

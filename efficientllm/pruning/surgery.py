"""Structured-pruning surgery: shrink this rank's model shards and optimizer state by a Plan.

Every rank runs the same code with the same Plan on its own shards; there are no collectives
here. The new model is built from `plan.apply(old_arch)` with `build_model_chunks`, and every new
parameter receives the slice of the old local shard that survives:

- `linear_qkv`  rows  = kept query heads / KV groups of this TP rank; columns = kept hidden
- `linear_proj` rows  = kept hidden;                                  columns = kept heads
- `linear_fc1`  rows  = kept gate rows then kept up rows;             columns = kept hidden
- `linear_fc2`  rows  = kept hidden;                                  columns = kept channels
- norm weights, embedding columns, output-layer columns: kept hidden (vocab rows untouched)

Removed whole layers (`plan.layers`) are supported when this rank holds the whole model
(PP = 1, no virtual stages); moving layers between pipeline stages is not done here.

Optimizer surgery (`slice_optimizer_state`) slices Adam moments (and fp32 main params under
mixed precision) with exactly the same indices, so training continues without a reset. Under
megatron's DistributedOptimizer every rank owns only a contiguous range of each flattened
parameter's state: the full state of every old parameter is assembled over the data-parallel
group (one all-reduce of zero-filled full-size tensors per parameter; the owned ranges are
disjoint, so the sums are exact), sliced, and each rank keeps the range of the new parameter it
owns in the new optimizer. That path is the only one with collectives (over DP only).
Gradients are not carried over: an event happens between steps, when they are zeroed anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state

from efficientllm.architecture import Architecture
from efficientllm.model import ModelOptions, build_model_chunks
from efficientllm.pruning.compensation import Compensated, obs_remove_columns
from efficientllm.pruning.layout import LayerLayout, complement, kept_hidden
from efficientllm.pruning.plan import Plan

# Consumers whose input columns a Plan removes, by the short name of their module.
CONSUMERS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
NORMS = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")


class SurgeryError(RuntimeError):
    """The model or optimizer cannot be sliced the way the Plan asks."""


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a megatron DDP (or any `.module`) wrapper."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


@dataclass
class ParamSlice:
    """One surviving parameter: new = old[rows][:, cols] (None = all)."""

    name: str  # name inside the new chunk
    old: torch.nn.Parameter
    new: torch.nn.Parameter
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    layer: int | None  # global layer index in the old Architecture (None outside the decoder)
    consumer: str | None  # short module name when the columns are a consumer's inputs

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The surviving slice of a tensor shaped like the old parameter."""
        if tuple(tensor.shape) != tuple(self.old.shape):
            raise SurgeryError(
                f"{self.name}: tensor {tuple(tensor.shape)} is not shaped like the parameter "
                f"{tuple(self.old.shape)}"
            )
        out = tensor
        if self.rows is not None:
            out = out.index_select(0, self.rows.to(out.device))
        if self.cols is not None:
            out = out.index_select(1, self.cols.to(out.device))
        if tuple(out.shape) != tuple(self.new.shape):
            raise SurgeryError(
                f"{self.name}: the surviving slice {tuple(out.shape)} does not match the new "
                f"parameter {tuple(self.new.shape)}"
            )
        return out.contiguous()


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
    old_chunks = [unwrap(c) for c in old_chunks]
    new_chunks = [unwrap(c) for c in new_chunks]
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
            consumer = None
            if parts[-1] != "weight":
                if tuple(old.shape) != tuple(new.shape):
                    raise SurgeryError(f"don't know how to slice {name} {tuple(old.shape)}")
            elif module == "word_embeddings":
                cols = hidden
            elif module == "output_layer":
                cols, consumer = hidden, "output_layer"
            elif module in NORMS:
                rows = hidden
            elif module == "linear_qkv":
                heads = plan.removed_heads(layer)
                rows = layout(layer).kept_qkv_rows(tp_rank, heads) if heads else None
                cols, consumer = hidden, "linear_qkv"
            elif module == "linear_proj":
                heads = plan.removed_heads(layer)
                rows = hidden
                cols = layout(layer).kept_proj_columns(tp_rank, heads) if heads else None
                consumer = "linear_proj"
            elif module == "linear_fc1":
                channels = plan.removed_ffn(layer)
                rows = layout(layer).kept_fc1_rows(tp_rank, channels) if channels else None
                cols, consumer = hidden, "linear_fc1"
            elif module == "linear_fc2":
                channels = plan.removed_ffn(layer)
                rows = hidden
                cols = layout(layer).kept_fc2_columns(tp_rank, channels) if channels else None
                consumer = "linear_fc2"
            elif tuple(old.shape) != tuple(new.shape):
                raise SurgeryError(f"don't know how to slice {name} {tuple(old.shape)}")
            slices.append(ParamSlice(name, old, new, rows, cols, layer, consumer))
    return slices


def _compensation_for(compensation: Mapping[Any, Any] | None, s: ParamSlice):
    if not compensation or s.consumer is None or s.cols is None:
        return None
    for key in ((s.layer, s.consumer), (s.layer, s.name.split(".weight")[0].split(".", 3)[-1])):
        if key in compensation:
            return compensation[key]
    return None


def _compensated_weight(s: ParamSlice, entry: Any, damping: float) -> torch.Tensor:
    """The old weight with the consumer's removed columns compensated and dropped (all rows)."""
    W = s.old.detach()
    if isinstance(entry, Compensated):
        if not torch.equal(entry.keep.cpu(), s.cols.cpu()):
            raise SurgeryError(f"{s.name}: the compensated weight kept other columns than the Plan")
        weight = entry.weight
    elif torch.is_tensor(entry):
        removed = complement(W.shape[1], s.cols)
        weight = obs_remove_columns(W, entry, removed, damping).weight
    else:
        raise SurgeryError(
            f"{s.name}: compensation entry must be a Compensated result or a Hessian tensor, "
            f"got {type(entry).__name__}"
        )
    if tuple(weight.shape) != (W.shape[0], s.cols.numel()):
        raise SurgeryError(f"{s.name}: compensated weight has shape {tuple(weight.shape)}")
    return weight


@torch.no_grad()
def prune_model(
    old_chunks: list[torch.nn.Module],
    plan: Plan,
    old_arch: Architecture,
    options: ModelOptions,
    compensation: Mapping[Any, Any] | None = None,
    damping: float = 0.01,
) -> list[torch.nn.Module]:
    """New (unwrapped) GPTModel chunks for `plan.apply(old_arch)` holding the surviving slices
    of this rank's old shards.

    `compensation` maps (old global layer index, consumer) -> either a `Compensated` result for
    that consumer's local weight (its columns already removed and compensated) or the consumer's
    rank-local input Hessian, from which structured OBS is run here. Consumers are
    "linear_proj" / "linear_fc2" (head / ffn removal) and "linear_qkv" / "linear_fc1" (hidden
    removal); the output layer's key is (None, "output_layer"). Rows are sliced afterwards.
    The global RNG state is left as it was."""
    new_arch = plan.apply(old_arch)
    rng = torch.random.get_rng_state()
    try:
        new_chunks = build_model_chunks(new_arch, options)
    finally:
        torch.random.set_rng_state(rng)
    for s in param_slices(old_chunks, new_chunks, plan, old_arch):
        entry = _compensation_for(compensation, s)
        if entry is None:
            value = s.take(s.old.detach())
        else:
            weight = _compensated_weight(s, entry, damping)
            value = weight if s.rows is None else weight.index_select(0, s.rows.to(weight.device))
            if tuple(value.shape) != tuple(s.new.shape):
                raise SurgeryError(f"{s.name}: compensated slice {tuple(value.shape)} != {tuple(s.new.shape)}")
        s.new.data.copy_(value.to(s.new.dtype))
    for old, new in zip(old_chunks, new_chunks):
        new.train(unwrap(old).training)
    return new_chunks


@torch.no_grad()
def mask_model(chunks: list[torch.nn.Module], plan: Plan, arch: Architecture) -> None:
    """Zero, in place, the head / ffn groups and whole layers the Plan removes in this rank's
    shards (Q rows + proj columns; gate/up rows + fc2 columns; proj and fc2 of a layer), so the
    model computes what the physically pruned one does. Hidden channels are not masked (that is
    not equivalent under RMSNorm)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        chunk = unwrap(chunk)
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


# ---- optimizer surgery ----------------------------------------------------------------------


def _leaf_optimizers(optimizer) -> list:
    if hasattr(optimizer, "chained_optimizers"):
        return [leaf for o in optimizer.chained_optimizers for leaf in _leaf_optimizers(o)]
    return [optimizer]


def _main_params(optimizer) -> dict[int, tuple[Any, torch.Tensor]]:
    """id(model param) -> (torch optimizer, the tensor its state is keyed by / its main param)."""
    out: dict[int, tuple[Any, torch.Tensor]] = {}
    for leaf in _leaf_optimizers(optimizer):
        if getattr(leaf, "is_stub_optimizer", False):
            continue
        name = type(leaf).__name__
        if "Distributed" in name:
            raise NotImplementedError(
                f"megatron's {name} keeps sharded flat state that has no per-parameter main "
                "param here; slice_optimizer_state handles it with _slice_distributed_state"
            )
        inner = leaf.optimizer
        if hasattr(leaf, "float16_groups"):
            for f16, f32 in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
                for model_param, main in zip(f16, f32):
                    out[id(model_param)] = (inner, main)
            for group in leaf.fp32_from_fp32_groups:
                for p in group:
                    out[id(p)] = (inner, p)
        else:
            for group in inner.param_groups:
                for p in group["params"]:
                    out[id(p)] = (inner, p)
    return out


@torch.no_grad()
def slice_optimizer_state(
    old_optimizer,
    old_model: list[torch.nn.Module],
    new_optimizer,
    new_model: list[torch.nn.Module],
    plan: Plan,
    old_arch: Architecture,
) -> int:
    """Give every parameter of `new_optimizer` the surviving slice of its old Adam state
    (exp_avg, exp_avg_sq, step, ...) and, under mixed precision, of its fp32 main param.

    A main param is sliced from the old one unless the new model weight differs from it (a
    compensated consumer): then it starts from the new weight. Returns how many parameters got
    state on this rank. Megatron's DistributedOptimizer is handled by `_slice_distributed_state`
    (collectives over the data-parallel group: call it on every rank)."""
    if _is_distributed(old_optimizer) or _is_distributed(new_optimizer):
        return _slice_distributed_state(old_optimizer, old_model, new_optimizer, new_model, plan, old_arch)
    old_main = _main_params(old_optimizer)
    new_main = _main_params(new_optimizer)
    moved = 0
    for s in param_slices(old_model, new_model, plan, old_arch):
        if id(s.new) not in new_main:
            continue  # frozen / not optimized
        if id(s.old) not in old_main:
            raise SurgeryError(f"{s.name}: the old optimizer does not hold this parameter")
        old_inner, old_p = old_main[id(s.old)]
        new_inner, new_p = new_main[id(s.new)]
        if new_p is not s.new:  # a separate fp32 main param
            sliced = s.take(old_p.detach())
            if torch.equal(sliced.to(s.new.dtype), s.new.detach()):
                new_p.data.copy_(sliced)
            else:
                new_p.data.copy_(s.new.detach().to(new_p.dtype))
        state = old_inner.state.get(old_p)
        if not state:
            continue
        new_state = {}
        for key, value in state.items():
            if torch.is_tensor(value) and tuple(value.shape) == tuple(old_p.shape) and value.dim() > 0:
                new_state[key] = s.take(value)
            elif torch.is_tensor(value):
                new_state[key] = value.clone()
            else:
                new_state[key] = value
        new_inner.state[new_p] = new_state
        moved += 1
    return moved


# ---- megatron's DistributedOptimizer ----------------------------------------------------------

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _active_leaves(optimizer) -> list:
    return [leaf for leaf in _leaf_optimizers(optimizer) if not getattr(leaf, "is_stub_optimizer", False)]


def _is_distributed(optimizer) -> bool:
    return any("Distributed" in type(leaf).__name__ for leaf in _active_leaves(optimizer))


def _owned_shards(optimizer) -> tuple[dict[int, tuple[Any, Any, torch.Tensor]], Any]:
    """id(model param) -> (torch optimizer, Range within the flattened param, its main-param
    shard) for the parameters of which this rank owns a range; and the data-parallel group."""
    out: dict[int, tuple[Any, Any, torch.Tensor]] = {}
    group = None
    for leaf in _active_leaves(optimizer):
        name = type(leaf).__name__
        if "Distributed" not in name:
            raise NotImplementedError(
                f"optimizer surgery cannot mix megatron's DistributedOptimizer with {name}"
            )
        if getattr(leaf.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            raise NotImplementedError(
                "optimizer surgery does not support megatron's precision-aware optimizer"
            )
        if group is None:
            group = leaf.data_parallel_group
        elif _group_ranks(group) != _group_ranks(leaf.data_parallel_group):
            raise NotImplementedError("distributed optimizers over different data-parallel groups")
        for model_param, (group_index, group_order) in leaf.model_param_group_index_map.items():
            param_range = leaf._get_model_param_range_map(model_param)["param"]
            main = leaf.optimizer.param_groups[group_index]["params"][group_order]
            out[id(model_param)] = (leaf.optimizer, param_range, main)
    if group is None:
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return out, group


def _group_ranks(group) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(group)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@torch.no_grad()
def _slice_distributed_state(
    old_optimizer, old_model, new_optimizer, new_model, plan: Plan, old_arch: Architecture
) -> int:
    """`slice_optimizer_state` for megatron's DistributedOptimizer (see the module docstring).
    Every parameter is visited in the same order on every DP rank."""
    import torch.distributed as dist

    old_owned, group = _owned_shards(old_optimizer)
    new_owned, new_group = _owned_shards(new_optimizer)
    if _group_ranks(group) != _group_ranks(new_group):
        raise SurgeryError("the old and new optimizers shard over different data-parallel groups")
    slices = param_slices(old_model, new_model, plan, old_arch)

    # The Adam step of every old parameter (-1: no rank holds state for it yet).
    steps = torch.full((len(slices),), -1.0, dtype=torch.float64)
    for i, s in enumerate(slices):
        if id(s.old) in old_owned:
            inner, _, main = old_owned[id(s.old)]
            state = inner.state.get(main) or {}
            extra = set(state) - {"step", *_ADAM_MOMENTS}
            if extra:
                raise SurgeryError(f"{s.name}: optimizer state keys {sorted(extra)} are not sliced")
            if "step" in state:
                steps[i] = float(state["step"])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)

    moved = 0
    for i, s in enumerate(slices):
        n = s.old.numel()
        full = torch.zeros(3 * n, dtype=torch.float32)
        if id(s.old) in old_owned:
            inner, r, main = old_owned[id(s.old)]
            if main.dtype != torch.float32:
                raise SurgeryError(f"{s.name}: main param dtype {main.dtype} is not fp32")
            full[r.start: r.end] = main.detach().view(-1)
            state = inner.state.get(main) or {}
            for k, key in enumerate(_ADAM_MOMENTS, start=1):
                if key in state:
                    full[k * n + r.start: k * n + r.end] = state[key].view(-1)
        dist.all_reduce(full, group=group)  # disjoint owned ranges: exact
        if id(s.new) not in new_owned:
            continue  # this rank owns no range of the new parameter
        shape = s.old.shape
        main_full = s.take(full[:n].view(shape))
        new_weight = s.new.detach()
        if not torch.equal(main_full.to(new_weight.dtype), new_weight):  # compensated consumer
            main_full = new_weight.float()
        new_inner, r, new_main = new_owned[id(s.new)]
        new_main.data.copy_(main_full.reshape(-1)[r.start: r.end])
        if steps[i] < 0:
            continue
        new_state = new_inner.state[new_main]
        for k, key in enumerate(_ADAM_MOMENTS, start=1):
            value = s.take(full[k * n: (k + 1) * n].view(shape)).reshape(-1)[r.start: r.end]
            if key in new_state:
                new_state[key].copy_(value)
            else:
                new_state[key] = value.clone().to(new_main.dtype)
        new_state["step"] = torch.tensor(steps[i].item(), dtype=_scalar_dtype())  # one per param
        # torch Adam expects "step" first (it creates the state in that order)
        new_inner.state[new_main] = {"step": new_state.pop("step"), **new_state}
        moved += 1
    return moved

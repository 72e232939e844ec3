"""Optimizer surgery: the new model's optimizer continues from the old one's state.

Adam moments (exp_avg, exp_avg_sq) are sliced with the same indices as their parameters and
keep their `step`, so training continues without a reset. Under mixed precision the new fp32
main params start from the exact fp32 values computed from the old fp32 masters (compensated
and rescaled as surgery says), not from the rounded model weights.

Three of megatron's optimizers are handled, recognised by type:
- `FP32Optimizer`: the parameters are their own main params;
- `Float16OptimizerWithFloat16Params`: separate full fp32 main params (`master_weights` gives
  them to surgery, which computes the new ones: `PrunedModel.masters`);
- `DistributedOptimizer`: every DP rank owns a contiguous range of each flattened parameter's
  main param and moments, and computes its new range from the old rows it needs, exchanging
  only the pieces other ranks own (`_slice_distributed_state`). Every DP rank visits the
  parameters in the same order.
Gradients are not carried over: an event happens between steps, when they are zeroed anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer

from efficientllm.pruning.megatron import sync
from efficientllm.pruning.megatron.groups import as_chunks
from efficientllm.pruning.megatron.surgery import ParamSlice, PrunedModel, SurgeryError
from megatron_patches.distrib_optimizer import owned_param_range

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
_SUPPORTED = (FP32Optimizer, Float16OptimizerWithFloat16Params, DistributedOptimizer)


def leaf_optimizers(optimizer) -> list:
    """The megatron optimizers inside a (possibly chained) one that hold parameters."""
    if isinstance(optimizer, ChainedOptimizer):
        return [leaf for o in optimizer.chained_optimizers for leaf in leaf_optimizers(o)]
    if getattr(optimizer, "is_stub_optimizer", False):
        return []
    if not isinstance(optimizer, _SUPPORTED):
        raise NotImplementedError(f"optimizer surgery does not know megatron's {type(optimizer).__name__}")
    return [optimizer]


def _is_distributed(optimizer) -> bool:
    leaves = leaf_optimizers(optimizer)
    distributed = [isinstance(leaf, DistributedOptimizer) for leaf in leaves]
    if any(distributed) and not all(distributed):
        raise NotImplementedError("optimizer surgery cannot mix megatron's DistributedOptimizer with others")
    return any(distributed)


def main_params(optimizer) -> dict[int, tuple[torch.optim.Optimizer, torch.Tensor]]:
    """id(model param) -> (torch optimizer, its main param: the tensor its state is keyed by),
    for the FP32 and Float16 optimizers."""
    out: dict[int, tuple[torch.optim.Optimizer, torch.Tensor]] = {}
    for leaf in leaf_optimizers(optimizer):
        inner = leaf.optimizer
        if isinstance(leaf, Float16OptimizerWithFloat16Params):
            for f16, f32 in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
                for model_param, main in zip(f16, f32):
                    out[id(model_param)] = (inner, main)
            for group in leaf.fp32_from_fp32_groups:
                for p in group:
                    out[id(p)] = (inner, p)
        elif isinstance(leaf, FP32Optimizer):
            for group in inner.param_groups:
                for p in group["params"]:
                    out[id(p)] = (inner, p)
        else:
            raise NotImplementedError("megatron's DistributedOptimizer keeps sharded main params")
    return out


def _owned_shards(optimizer) -> tuple[dict[int, tuple[torch.optim.Optimizer, Any, torch.Tensor]], Any]:
    """id(model param) -> (torch optimizer, owned Range within the flattened param, its main-param
    shard) for the parameters of which this rank owns a range; and the data-parallel group."""
    out: dict[int, tuple[torch.optim.Optimizer, Any, torch.Tensor]] = {}
    group = None
    for leaf in leaf_optimizers(optimizer):
        if leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            raise NotImplementedError("optimizer surgery does not support megatron's precision-aware optimizer")
        if group is None:
            group = leaf.data_parallel_group
        elif sync.group_ranks(group) != sync.group_ranks(leaf.data_parallel_group):
            raise NotImplementedError("distributed optimizers over different data-parallel groups")
        for model_param, (group_index, group_order) in leaf.model_param_group_index_map.items():
            main = leaf.optimizer.param_groups[group_index]["params"][group_order]
            out[id(model_param)] = (leaf.optimizer, owned_param_range(leaf, model_param), main)
    if group is None:
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return out, group


@torch.no_grad()
def master_weights(optimizer, model) -> dict[int, torch.Tensor]:
    """id(model param) -> its whole fp32 main param, for every model param stored in a lower
    precision that has one (empty for an fp32 model, and under the distributed optimizer, whose
    main params are sharded: `slice_optimizer_state` computes the new ones from the shards)."""
    params = [p for chunk in as_chunks(model) for p in chunk.parameters() if p.dtype != torch.float32]
    if not params or _is_distributed(optimizer):
        return {}
    mains = main_params(optimizer)
    return {id(p): mains[id(p)][1] for p in params if id(p) in mains}


def _new_main(s: ParamSlice, masters: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The exact fp32 value the new parameter's main param starts from."""
    return masters[id(s.new)] if id(s.new) in masters else s.new.detach().float()


@torch.no_grad()
def slice_optimizer_state(old_optimizer, new_optimizer, pruned: PrunedModel) -> int:
    """Give every parameter of `new_optimizer` (built on `pruned.chunks`) the surviving slice of
    its old Adam state and its main param (surgery's exact value). Returns how many parameters
    got state on this rank. Under the distributed optimizer a collective over DP: call on every
    rank."""
    if _is_distributed(old_optimizer) or _is_distributed(new_optimizer):
        return _slice_distributed_state(old_optimizer, new_optimizer, pruned.slices)
    old_main, new_main = main_params(old_optimizer), main_params(new_optimizer)
    moved = 0
    for s in pruned.slices:
        if id(s.new) not in new_main:
            continue  # frozen / not optimized
        if id(s.old) not in old_main:
            raise SurgeryError(f"{s.name}: the old optimizer does not hold this parameter")
        old_inner, old_p = old_main[id(s.old)]
        new_inner, new_p = new_main[id(s.new)]
        if new_p is not s.new:  # a separate fp32 main param
            new_p.data.copy_(_new_main(s, pruned.masters))
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


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _row_width(param: torch.Tensor) -> int:
    return param.numel() // param.shape[0]


def _new_rows(s: ParamSlice, owned: tuple[int, int]) -> range:
    """The rows of the new parameter that its flat range `owned` lies in."""
    start, end = owned
    width = _row_width(s.new)
    return range(start // width, (end - 1) // width + 1) if end > start else range(0)


def _needed(s: ParamSlice, owned: tuple[int, int]) -> tuple[int, int]:
    """The flat range of the old parameter, whole rows, that the new flat range `owned` is
    computed from (surgery is row-local)."""
    rows = s.old_rows(_new_rows(s, owned))
    width = _row_width(s.old)
    return rows.start * width, rows.stop * width


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if end > start else None


@dataclass
class _Ownership:
    """Per DP rank and slice: the owned flat ranges of the old and the new parameter, and the
    old range the new one is computed from; per slice: its Adam step (-1: no state yet) and
    the flat fp32 tensors that travel (the main param where it is not the model weight itself,
    the Adam moments where there are any). Identical on every DP rank."""

    old: list[list[tuple[int, int]]]
    new: list[list[tuple[int, int]]]
    needed: list[list[tuple[int, int]]]
    steps: list[int]
    kinds: list[tuple[str, ...]]

    def piece(self, i: int, sender: int, receiver: int) -> tuple[int, int] | None:
        """The part of the old parameter `i` that `sender` owns and `receiver` needs."""
        return _overlap(self.old[sender][i], self.needed[receiver][i])


def _ownership(slices: list[ParamSlice], old_owned: dict, new_owned: dict, group, device) -> _Ownership:
    """Every DP rank's owned ranges of every slice and its Adam step, in one small all-gather."""
    table = torch.zeros(len(slices), 5, dtype=torch.int64, device=device)
    table[:, 4] = -1
    for i, s in enumerate(slices):
        if id(s.old) in old_owned:
            inner, r, main = old_owned[id(s.old)]
            state = inner.state.get(main) or {}
            extra = set(state) - {"step", *_ADAM_MOMENTS}
            if extra:
                raise SurgeryError(f"{s.name}: optimizer state keys {sorted(extra)} are not sliced")
            table[i, 0], table[i, 1] = r.start, r.end
            if "step" in state:
                table[i, 4] = int(state["step"])
        if id(s.new) in new_owned:
            _, r, _ = new_owned[id(s.new)]
            table[i, 2], table[i, 3] = r.start, r.end
    ranks = [t.tolist() for t in sync.gather_over(table, group)]
    old = [[(row[0], row[1]) for row in rank] for rank in ranks]
    new = [[(row[2], row[3]) for row in rank] for rank in ranks]
    for i, s in enumerate(slices):
        for label, owned, param in (("old", old, s.old), ("new", new, s.new)):
            if sum(end - start for start, end in (rank[i] for rank in owned)) != param.numel():
                raise SurgeryError(f"{s.name}: the DP ranks' owned ranges of the {label} parameter do not tile it")
    steps = [max(rank[i][4] for rank in ranks) for i in range(len(slices))]
    kinds = [(("param",) if s.old.dtype != torch.float32 else ()) + (_ADAM_MOMENTS if steps[i] >= 0 else ())
             for i, s in enumerate(slices)]
    needed = [[_needed(s, rank[i]) for i, s in enumerate(slices)] for rank in new]
    return _Ownership(old, new, needed, steps, kinds)


def _old_piece(old_owned: dict, s: ParamSlice, kind: str, owned: tuple[int, int], piece: tuple[int, int],
               device) -> torch.Tensor:
    """Elements `piece` of this rank's owned range `owned` of the old main param or moment
    `kind` (zeros where it has no state yet)."""
    inner, _, main = old_owned[id(s.old)]
    if kind == "param":
        flat = main.detach().view(-1)
    else:
        state = inner.state.get(main) or {}
        if kind not in state:
            return torch.zeros(piece[1] - piece[0], device=device)
        flat = state[kind].view(-1)
    return flat[piece[0] - owned[0]: piece[1] - owned[0]]


def _exchange_pieces(slices: list[ParamSlice], own: _Ownership, old_owned: dict, me: int, group,
                     device) -> list[torch.Tensor]:
    """Send every other DP rank the pieces of old state it needs and this rank owns; returns
    what each rank sent here (per slice, per kind, in slice order)."""
    size = len(own.old)
    sends: list[list[torch.Tensor]] = [[] for _ in range(size)]
    receive = [0] * size
    for i, s in enumerate(slices):
        for other in range(size):
            if other == me:
                continue
            out, into = own.piece(i, me, other), own.piece(i, other, me)
            for kind in own.kinds[i]:
                if out is not None:
                    sends[other].append(_old_piece(old_owned, s, kind, own.old[me][i], out, device))
                if into is not None:
                    receive[other] += into[1] - into[0]
    empty = torch.zeros(0, device=device)
    return sync.exchange([torch.cat(p) if p else empty for p in sends], receive, group)


def _needed_state(i: int, s: ParamSlice, own: _Ownership, old_owned: dict, received: list[torch.Tensor],
                  read: list[int], me: int, device) -> dict[str, torch.Tensor]:
    """The old state (per kind, flat) over the whole rows rank `me`'s new range of slice `i` is
    computed from: its own pieces, and the next pieces of what the others sent (`read` is how
    far each rank's has been read)."""
    start, end = own.needed[me][i]
    spans = {kind: torch.empty(end - start, dtype=torch.float32, device=device) for kind in own.kinds[i]}
    for other in range(len(own.old)):
        piece = own.piece(i, other, me)
        if piece is None:
            continue
        for kind, span in spans.items():
            target = span[piece[0] - start: piece[1] - start]
            if other == me:
                target.copy_(_old_piece(old_owned, s, kind, own.old[me][i], piece, device))
            else:
                n = piece[1] - piece[0]
                target.copy_(received[other][read[other]: read[other] + n])
                read[other] += n
    return spans


def _new_range(s: ParamSlice, span: torch.Tensor, needed: tuple[int, int], owned: tuple[int, int],
               corrected: bool) -> torch.Tensor:
    """The new flat range `owned` from the old whole rows `span` (flat range `needed`)."""
    old_width, new_width = _row_width(s.old), _row_width(s.new)
    block = span if s.old.dim() == 1 else span.view(-1, old_width)
    rows = _new_rows(s, owned)
    value = s.rows_value(block, needed[0] // old_width, rows, corrected).reshape(-1)
    return value[owned[0] - rows.start * new_width: owned[1] - rows.start * new_width]


@torch.no_grad()
def _slice_distributed_state(old_optimizer, new_optimizer, slices: list[ParamSlice]) -> int:
    """`slice_optimizer_state` for megatron's DistributedOptimizer.

    Every DP rank owns a contiguous range of each flattened parameter's main param and moments.
    A rank's new range is computed, row by row, from whole old rows (`_needed`): it takes the
    parts of those it owns from its old state and receives the rest from their old owners in
    one all-to-all over DP, so only what the shifted range boundaries move crosses ranks. The
    new fp32 main param of a parameter stored in a lower precision is computed here from the old
    fp32 masters (compensated / rescaled where surgery corrects it); the model's copy of a
    corrected one becomes its rounding, all-gathered over DP as megatron's param sync does after
    a step. An fp32 parameter is its own main param, exact already."""
    old_owned, group = _owned_shards(old_optimizer)
    new_owned, new_group = _owned_shards(new_optimizer)
    if sync.group_ranks(group) != sync.group_ranks(new_group):
        raise SurgeryError("the old and new optimizers shard over different data-parallel groups")
    if not slices:
        return 0
    device = slices[0].old.device
    own = _ownership(slices, old_owned, new_owned, group, device)
    me = sync.group_rank(group)
    received = _exchange_pieces(slices, own, old_owned, me, group, device)
    read = [0] * len(own.old)
    moved, rounded = 0, []
    for i, s in enumerate(slices):
        if id(s.new) not in new_owned:
            continue
        new_inner, _, new_main = new_owned[id(s.new)]
        owned, needed = own.new[me][i], own.needed[me][i]
        spans = _needed_state(i, s, own, old_owned, received, read, me, device)
        if "param" in spans:
            value = _new_range(s, spans["param"], needed, owned, corrected=True)
            if s.corrected:
                rounded.append(value.to(s.new.dtype))
        else:
            value = s.new.detach().reshape(-1)[owned[0]: owned[1]]
        new_main.data.copy_(value)
        if own.steps[i] < 0:
            continue
        new_state = new_inner.state[new_main]
        for key in _ADAM_MOMENTS:
            value = _new_range(s, spans[key], needed, owned, corrected=False)
            if key in new_state:
                new_state[key].copy_(value)
            else:
                new_state[key] = value.to(new_main.dtype)  # its own memory: a view of a fresh span
        step = torch.tensor(float(own.steps[i]), dtype=_scalar_dtype())  # cpu-ok: one per param, where torch's non-fused Adam keeps it
        # torch Adam expects "step" first (it creates the state in that order)
        new_inner.state[new_main] = {"step": step, **{k: v for k, v in new_state.items() if k != "step"}}
        moved += 1
    _gather_rounded_weights(slices, own, rounded, group, device)
    return moved


def _gather_rounded_weights(slices: list[ParamSlice], own: _Ownership, mine: list[torch.Tensor], group,
                            device) -> None:
    """Every rank's rounding of its new ranges of the corrected low-precision parameters,
    all-gathered into the model weights (an uncorrected slice holds the right value already:
    the rounding of a sliced master is the slice of its rounding)."""
    corrected = [i for i, s in enumerate(slices) if s.corrected and "param" in own.kinds[i]]
    if not corrected:
        return
    dtype = slices[corrected[0]].new.dtype
    sizes = [sum(rank[i][1] - rank[i][0] for i in corrected) for rank in own.new]
    local = torch.cat(mine) if mine else torch.zeros(0, dtype=dtype, device=device)
    for rank, values in zip(own.new, sync.gather_uneven(local, sizes, group)):
        offset = 0
        for i in corrected:
            start, end = rank[i]
            slices[i].new.data.view(-1)[start:end] = values[offset: offset + end - start]
            offset += end - start

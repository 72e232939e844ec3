"""Global selection: which groups one pruning event removes.

All candidates of all kinds and layers are ranked together by saliency per removed parameter
(or per group, or per parameter with a weight per kind) and the cheapest *removal units* are
taken greedily until the event's budget is met. A unit is the smallest removal that keeps the
model buildable under the constraints:

- ffn (per layer): lcm(align, tp) channels, the lcm/tp cheapest remaining ones on each TP rank.
  If the width is not yet a multiple of lcm(align, tp), the first unit removes the remainder.
- head (per layer), two unit shapes:
  * "head": one query head from every KV group (each group drops its cheapest remaining head),
    so every group keeps the same number of heads;
  * "kv_group": tp whole KV groups, the cheapest one on each TP rank (all its remaining heads
    plus its k/v rows); only while the group count stays >= max(tp, min_query_groups).
- hidden: `align` channels (hidden is replicated over TP), cheapest first; the first unit
  removes hidden_size % align if that is not zero.
- layer (optional): one whole transformer block.

A unit's score is the sum of its groups' scores. Ranking sizes are taken from the Architecture
at the start of the event; the budget is checked with the exact parameter count. Ties break on
(value, kind head<ffn<hidden<layer, layer, unit shape, smallest index), and sums are exactly
rounded (math.fsum), so equal inputs give bit-identical plans.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from efficientllm.architecture import Architecture
from efficientllm.pruning.layout import GroupSizes, LayerLayout
from efficientllm.pruning.plan import KINDS, Plan

NORMALISATIONS = ("per_parameter", "per_group")
# "per_parameter" (s/|g|), "per_group" (s per group), or {kind: weight} (weight * s/|g|, missing
# kinds weigh 1). For a unit of several groups: its summed score over its size / group count.
Normalisation = Union[str, Mapping[str, float]]

_KIND_RANK = {k: i for i, k in enumerate(KINDS)}
_UNIT_FAMILY = {
    "head": "head",
    "kv_group": "head",
    "ffn": "ffn",
    "hidden": "hidden",
    "layer": "layer",
}
_UNIT_SHAPE = {"head": 0, "kv_group": 1, "ffn": 0, "hidden": 0, "layer": 0}


@dataclass(frozen=True)
class Constraints:
    """What a selection must keep buildable. Minimums are absolute widths; `max_ratio` caps the
    fraction of a kind's width (per layer for head/ffn, of the model for hidden/layer) that one
    event may remove, relative to the Architecture the event starts from."""

    tensor_parallel_size: int = 1
    align: int = 1  # ffn widths stay multiples of lcm(align, tp), hidden of align
    min_heads_per_layer: int = 1
    min_query_groups: int = 1
    min_ffn_per_layer: int = 1
    min_hidden: int = 1
    min_layers: int = 1
    max_ratio: Mapping[str, float] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("head", "ffn", "hidden")

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.align < 1:
            raise ValueError(f"align must be >= 1, got {self.align}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown pruning kinds {sorted(unknown)}; known: {list(KINDS)}")
        for kind, ratio in self.max_ratio.items():
            if kind not in KINDS:
                raise ValueError(f"max_ratio: unknown kind {kind!r}; known: {list(KINDS)}")
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"max_ratio[{kind!r}] must be in [0, 1], got {ratio}")

    @property
    def ffn_unit(self) -> int:
        return math.lcm(self.align, self.tensor_parallel_size)

    @property
    def hidden_unit(self) -> int:
        return self.align


@dataclass(frozen=True)
class Unit:
    """One removal taken by the selection."""

    kind: str  # head | kv_group | ffn | hidden | layer
    layer: int  # 0 for hidden
    indices: tuple[int, ...]  # global heads / ffn channels / hidden channels / (layer,)
    score: float  # summed saliency of its groups
    size: int  # parameters, from the Architecture at the event start (used for ranking)
    groups: int  # number of minimal groups in it (heads for head/kv_group units)
    value: float  # the normalised score it was ranked by
    removed: int = 0  # exact parameters it removed when taken

    @property
    def key(self) -> tuple[float, int, int, int, int]:
        family = _UNIT_FAMILY[self.kind]
        return (self.value, _KIND_RANK[family], self.layer, _UNIT_SHAPE[self.kind], self.indices[0])


@dataclass(frozen=True)
class Selection:
    """The outcome of one event's selection."""

    plan: Plan
    units: tuple[Unit, ...]  # in the order taken
    params_before: int
    params_after: int  # exact: plan.apply(arch).num_parameters()
    target_params: int

    @property
    def met(self) -> bool:
        return self.params_after <= self.target_params

    @property
    def shortfall(self) -> int:
        """Parameters still above the target (0 when the budget was met)."""
        return max(0, self.params_after - self.target_params)

    @property
    def overshoot(self) -> int:
        """Parameters removed beyond the budget (less than the last unit's size)."""
        return max(0, self.target_params - self.params_after)


# -- constraint predicates, shared by the selection and by smallest_reachable ---------------


def _step(width: int, unit: int) -> int:
    """How many channels the next unit removes: the remainder first, then whole units."""
    return width % unit or unit


def _step_allowed(width: int, step: int, minimum: int) -> bool:
    return width - step >= max(minimum, 1)


def _terminal_width(width: int, unit: int, minimum: int) -> int:
    """The width greedy removal ends at."""
    step = _step(width, unit)
    if not _step_allowed(width, step, minimum):
        return width
    width -= step
    return width - unit * ((width - max(minimum, 1)) // unit)


def _head_allowed(groups: int, hpg: int, c: Constraints) -> bool:
    return hpg >= 2 and (hpg - 1) * groups >= c.min_heads_per_layer


def _group_allowed(groups: int, hpg: int, c: Constraints) -> bool:
    tp = c.tensor_parallel_size
    left = groups - tp
    return left >= max(tp, c.min_query_groups, 1) and left * hpg >= c.min_heads_per_layer


def _largest_head_terminal(groups: int, hpg: int, c: Constraints) -> tuple[int, int]:
    """Of the (groups, heads per group) states where greedy head removal can stop, the one with
    the most attention parameters (∝ groups * (hpg + 1)): reachable whatever the scores."""
    seen: dict[tuple[int, int], tuple[int, int, int]] = {}

    def worst(g: int, p: int) -> tuple[int, int, int]:
        if (g, p) not in seen:
            options = []
            if _head_allowed(g, p, c):
                options.append(worst(g, p - 1))
            if _group_allowed(g, p, c):
                options.append(worst(g - c.tensor_parallel_size, p))
            seen[(g, p)] = max(options) if options else (g * (p + 1), g, p)
        return seen[(g, p)]

    _, g, p = worst(groups, hpg)
    return g, p


def smallest_reachable(arch: Architecture, constraints: Constraints) -> int:
    """A parameter count that greedy selection reaches whatever the scores: every enabled kind
    at its minimum width and alignment (for heads, the largest state where removal can stop;
    with layers enabled, the largest layers are the ones kept). max_ratio is per event and not
    counted here."""
    c = constraints
    kinds = set(c.kinds)
    h = arch.hidden_size
    if "hidden" in kinds:
        h = _terminal_width(h, c.hidden_unit, c.min_hidden)
    d = arch.head_dim
    coefficients = []
    for widths in arch.layers:
        groups, hpg, f = widths.num_query_groups, widths.heads_per_group, widths.ffn_hidden_size
        if "head" in kinds:
            groups, hpg = _largest_head_terminal(groups, hpg, c)
        if "ffn" in kinds:
            f = _terminal_width(f, c.ffn_unit, c.min_ffn_per_layer)
        coefficients.append(_layer_coefficient(d, groups * hpg, groups, f))
    if "layer" in kinds:
        keep = min(len(coefficients), max(c.min_layers, 1))
        coefficients = sorted(coefficients, reverse=True)[:keep]
    return h * (_model_coefficient(arch) + sum(coefficients))


def check_reachable(arch: Architecture, target_params: int, constraints: Constraints) -> None:
    """Raise ValueError if pruning `arch` down to `target_params` cannot be guaranteed."""
    floor = smallest_reachable(arch, constraints)
    if target_params < floor:
        c = constraints
        raise ValueError(
            f"target_params {target_params} unreachable: the smallest model allowed by min "
            f"widths/align has {floor} parameters (kinds {list(c.kinds)}, "
            f"tensor_parallel_size {c.tensor_parallel_size}, align {c.align}, "
            f"min_heads_per_layer {c.min_heads_per_layer}, min_query_groups "
            f"{c.min_query_groups}, min_ffn_per_layer {c.min_ffn_per_layer}, min_hidden "
            f"{c.min_hidden}, min_layers {c.min_layers})"
        )


# Parameters are exactly hidden_size * (model coefficient + sum of layer coefficients).
def _model_coefficient(arch: Architecture) -> int:
    return arch.vocab_size * (1 if arch.tie_embeddings else 2) + 1  # embeddings + final norm


def _layer_coefficient(head_dim: int, heads: int, groups: int, ffn: int) -> int:
    return head_dim * (2 * heads + 2 * groups) + 3 * ffn + 2  # qkv + proj, fc1 + fc2, norms


# -- scores -----------------------------------------------------------------------------------


def _as_floats(value: Any, width: int, what: str) -> list[float]:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if tuple(tensor.shape) != (width,):
        raise ValueError(f"{what}: expected shape ({width},), got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what}: scores must be finite")
    return tensor.tolist()


def _per_layer(value: Any, widths: Sequence[int], kind: str) -> list[list[float]]:
    n = len(widths)
    if isinstance(value, Mapping):
        if set(value) != set(range(n)):
            raise ValueError(f"scores[{kind!r}]: expected layers 0..{n - 1}, got {sorted(value)}")
        value = [value[l] for l in range(n)]
    elif torch.is_tensor(value) and value.dim() == 2:
        value = list(value)
    value = list(value)
    if len(value) != n:
        raise ValueError(f"scores[{kind!r}]: expected {n} layers, got {len(value)}")
    return [
        _as_floats(v, w, f"scores[{kind!r}][{l}]") for l, (v, w) in enumerate(zip(value, widths))
    ]


def _weights(normalisation: Normalisation) -> tuple[bool, dict[str, float]]:
    """(per_parameter, weight per kind)."""
    if isinstance(normalisation, Mapping):
        unknown = set(normalisation) - set(KINDS)
        if unknown:
            raise ValueError(f"normalisation weights: unknown kinds {sorted(unknown)}")
        weights = {k: float(normalisation.get(k, 1.0)) for k in KINDS}
        if any(not math.isfinite(w) or w <= 0 for w in weights.values()):
            raise ValueError(f"normalisation weights must be positive and finite, got {weights}")
        return True, weights
    if normalisation not in NORMALISATIONS:
        raise ValueError(
            f"normalisation must be one of {NORMALISATIONS} or a {{kind: weight}} mapping, "
            f"got {normalisation!r}"
        )
    return normalisation == "per_parameter", {k: 1.0 for k in KINDS}


# -- the greedy selection ---------------------------------------------------------------------


class _Selector:
    def __init__(
        self,
        arch: Architecture,
        scores: Mapping[str, Any],
        constraints: Constraints,
        normalisation: Normalisation,
    ) -> None:
        c = self.c = constraints
        tp = c.tensor_parallel_size
        arch.validate(tp)
        self.arch = arch
        self.kinds = set(c.kinds)
        self.per_parameter, self.weights = _weights(normalisation)
        self.sizes = GroupSizes.of(arch)
        self.layouts = [LayerLayout.of(arch, l, tp) for l in range(arch.num_layers)]
        missing = [k for k in c.kinds if k not in scores]
        if missing:
            raise ValueError(f"constraints enable kinds {missing} but scores has no entry for them")
        L = arch.num_layers

        def by_score(values: list[float], indices: Iterable[int]) -> list[int]:
            return sorted(indices, key=lambda i: (values[i], i))

        # Remaining candidates in removal order (cheapest first), consumed from the front.
        if "head" in self.kinds:
            self.head_scores = _per_layer(
                scores["head"], [w.num_attention_heads for w in arch.layers], "head"
            )
            # k/v rows go only with a whole group; without their scores they count as free.
            kv = scores.get("kv_group")
            groups = [w.num_query_groups for w in arch.layers]
            self.kv_scores = (
                _per_layer(kv, groups, "kv_group")
                if kv is not None
                else [[0.0] * n for n in groups]
            )
            self.group_queue = [
                [
                    by_score(self.head_scores[l], lay.heads_of_group(g))
                    for g in range(lay.widths.num_query_groups)
                ]
                for l, lay in enumerate(self.layouts)
            ]
        if "ffn" in self.kinds:
            self.ffn_scores = _per_layer(
                scores["ffn"], [w.ffn_hidden_size for w in arch.layers], "ffn"
            )
            self.ffn_queue = [
                [by_score(self.ffn_scores[l], lay.ffn_on_rank(r)) for r in range(tp)]
                for l, lay in enumerate(self.layouts)
            ]
        if "hidden" in self.kinds:
            self.hidden_scores = _as_floats(scores["hidden"], arch.hidden_size, "scores['hidden']")
            self.hidden_queue = by_score(self.hidden_scores, range(arch.hidden_size))
        if "layer" in self.kinds:
            self.layer_scores = _as_floats(scores["layer"], L, "scores['layer']")

        # Current state.
        self.groups_alive = [list(range(w.num_query_groups)) for w in arch.layers]
        self.hpg = [w.heads_per_group for w in arch.layers]
        self.ffn = [w.ffn_hidden_size for w in arch.layers]
        self.alive = [True] * L
        self.h = arch.hidden_size
        self.removed_heads: list[list[int]] = [[] for _ in range(L)]
        self.removed_ffn: list[list[int]] = [[] for _ in range(L)]
        self.removed_hidden: list[int] = []
        self.removed_layers: list[int] = []
        self.coefficients = [self._coefficient(l) for l in range(L)]
        self.params = self._params()
        assert self.params == arch.num_parameters(), "parameter formula out of sync"

        # Per-event caps from max_ratio.
        def cap(kind: str, width: int) -> int:
            return math.floor(c.max_ratio[kind] * width) if kind in c.max_ratio else width

        self.head_cap = [cap("head", w.num_attention_heads) for w in arch.layers]
        self.ffn_cap = [cap("ffn", w.ffn_hidden_size) for w in arch.layers]
        self.hidden_cap = cap("hidden", arch.hidden_size)
        self.layer_cap = cap("layer", L)

    # -- exact parameter count ---------------------------------------------------------------
    def _coefficient(self, l: int) -> int:
        groups = len(self.groups_alive[l])
        return _layer_coefficient(self.arch.head_dim, groups * self.hpg[l], groups, self.ffn[l])

    def _params(self) -> int:
        return self.h * (_model_coefficient(self.arch) + sum(self.coefficients))

    # -- candidate units ---------------------------------------------------------------------
    def _unit(
        self,
        kind: str,
        layer: int,
        indices: list[int],
        scores: Iterable[float],
        size: int,
        groups: int,
    ) -> Unit:
        score = math.fsum(scores)
        family = _UNIT_FAMILY[kind]
        if self.per_parameter:
            value = self.weights[family] * score / size
        else:
            value = score / groups
        return Unit(kind, layer, tuple(sorted(indices)), score, size, groups, value)

    def candidate(self, stream: tuple[str, int]) -> Unit | None:
        kind, l = stream
        c = self.c
        if kind == "head":
            groups, hpg = len(self.groups_alive[l]), self.hpg[l]
            if not self.alive[l] or not _head_allowed(groups, hpg, c):
                return None
            if len(self.removed_heads[l]) + groups > self.head_cap[l]:
                return None
            picks = [self.group_queue[l][g][0] for g in self.groups_alive[l]]
            scores = (self.head_scores[l][k] for k in picks)
            return self._unit("head", l, picks, scores, groups * self.sizes.head, groups)
        if kind == "kv_group":
            groups, hpg = len(self.groups_alive[l]), self.hpg[l]
            tp = c.tensor_parallel_size
            if not self.alive[l] or not _group_allowed(groups, hpg, c):
                return None
            if len(self.removed_heads[l]) + tp * hpg > self.head_cap[l]:
                return None
            layout, queue, values, kv = (
                self.layouts[l],
                self.group_queue[l],
                self.head_scores[l],
                self.kv_scores[l],
            )

            def group_score(g: int) -> list[float]:
                return [values[k] for k in queue[g]] + [kv[g]]

            picks: list[int] = []
            scores: list[float] = []
            for r in range(tp):
                on_rank = [g for g in self.groups_alive[l] if layout.rank_of_group(g) == r]
                g = min(on_rank, key=lambda g: (math.fsum(group_score(g)), g))
                picks.extend(queue[g])
                scores.extend(group_score(g))
            size = tp * (hpg * self.sizes.head + self.sizes.kv_group)
            return self._unit("kv_group", l, picks, scores, size, tp * hpg)
        if kind == "ffn":
            step = _step(self.ffn[l], c.ffn_unit)
            if not self.alive[l] or not _step_allowed(self.ffn[l], step, c.min_ffn_per_layer):
                return None
            if len(self.removed_ffn[l]) + step > self.ffn_cap[l]:
                return None
            share = step // c.tensor_parallel_size
            picks = [ch for queue in self.ffn_queue[l] for ch in queue[:share]]
            scores = (self.ffn_scores[l][ch] for ch in picks)
            return self._unit("ffn", l, picks, scores, step * self.sizes.ffn, step)
        if kind == "hidden":
            step = _step(self.h, c.hidden_unit)
            if not _step_allowed(self.h, step, c.min_hidden):
                return None
            if len(self.removed_hidden) + step > self.hidden_cap:
                return None
            picks = self.hidden_queue[:step]
            scores = (self.hidden_scores[ch] for ch in picks)
            return self._unit("hidden", 0, picks, scores, step * self.sizes.hidden, step)
        if kind == "layer":
            left = sum(self.alive)
            if not self.alive[l] or left - 1 < max(c.min_layers, 1):
                return None
            if len(self.removed_layers) + 1 > self.layer_cap:
                return None
            return self._unit("layer", l, [l], [self.layer_scores[l]], self.sizes.layers[l], 1)
        raise AssertionError(kind)

    def streams(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for l in range(self.arch.num_layers):
            if "head" in self.kinds:
                out += [("head", l), ("kv_group", l)]
            if "ffn" in self.kinds:
                out.append(("ffn", l))
            if "layer" in self.kinds:
                out.append(("layer", l))
        if "hidden" in self.kinds:
            out.append(("hidden", 0))
        return out

    # -- taking a unit -----------------------------------------------------------------------
    def take(self, unit: Unit) -> tuple[Unit, list[tuple[str, int]]]:
        """Apply the unit to the state; return it with its exact size and the streams whose
        next candidate changed."""
        before = self.params
        kind, l = unit.kind, unit.layer
        if kind == "head":
            for g in self.groups_alive[l]:
                self.group_queue[l][g].pop(0)
            self.removed_heads[l].extend(unit.indices)
            self.hpg[l] -= 1
            changed = [("head", l), ("kv_group", l)]
        elif kind == "kv_group":
            gone = {self.layouts[l].group_of_head(k) for k in unit.indices}
            self.groups_alive[l] = [g for g in self.groups_alive[l] if g not in gone]
            for g in gone:
                self.group_queue[l][g] = []
            self.removed_heads[l].extend(unit.indices)
            changed = [("head", l), ("kv_group", l)]
        elif kind == "ffn":
            share = len(unit.indices) // self.c.tensor_parallel_size
            for queue in self.ffn_queue[l]:
                del queue[:share]
            self.removed_ffn[l].extend(unit.indices)
            self.ffn[l] -= len(unit.indices)
            changed = [("ffn", l)]
        elif kind == "hidden":
            del self.hidden_queue[: len(unit.indices)]
            self.removed_hidden.extend(unit.indices)
            self.h -= len(unit.indices)
            changed = [("hidden", 0)]
        else:  # layer
            self.alive[l] = False
            self.removed_layers.append(l)
            self.removed_heads[l], self.removed_ffn[l] = [], []
            changed = []
        self.coefficients[l] = self._coefficient(l) if self.alive[l] else 0
        self.params = self._params()
        return _replace_removed(unit, before - self.params), changed

    def plan(self) -> Plan:
        L = self.arch.num_layers
        return Plan(
            heads={l: self.removed_heads[l] for l in range(L)},
            ffn={l: self.removed_ffn[l] for l in range(L)},
            hidden=self.removed_hidden,
            layers=self.removed_layers,
        )


def _replace_removed(unit: Unit, removed: int) -> Unit:
    return Unit(
        unit.kind, unit.layer, unit.indices, unit.score, unit.size, unit.groups, unit.value, removed
    )


def select(
    arch: Architecture,
    scores: Mapping[str, Any],
    budget_params: int,
    constraints: Constraints | None = None,
    normalisation: Normalisation = "per_parameter",
) -> Selection:
    """Remove the cheapest units until at least `budget_params` parameters are gone.

    `scores` maps kind to global saliencies: "head" and "ffn" per layer (a sequence or
    {layer: tensor}, each [num_attention_heads] in global head order / [ffn_hidden_size]),
    "hidden" a tensor [hidden_size], "layer" a tensor [num_layers]; optionally "kv_group" per
    layer [num_query_groups], the saliency of each group's k/v rows, added to a whole-group
    removal (missing: those rows count as free). Only the kinds enabled in `constraints.kinds`
    are read. Stops as soon as the budget is met (overshooting by less than
    the last unit); if the constraints run out first, returns everything allowed with
    `Selection.met` False and the `shortfall`.
    """
    constraints = constraints or Constraints()
    selector = _Selector(arch, scores, constraints, normalisation)
    before = selector.params
    target = before - int(budget_params)

    heap: list[tuple[tuple, tuple[str, int], int, Unit]] = []
    version: dict[tuple[str, int], int] = {}

    def push(stream: tuple[str, int]) -> None:
        version[stream] = version.get(stream, 0) + 1
        unit = selector.candidate(stream)
        if unit is not None:
            heapq.heappush(heap, (unit.key, stream, version[stream], unit))

    for stream in selector.streams():
        push(stream)

    taken: list[Unit] = []
    while selector.params > target and heap:
        key, stream, v, unit = heapq.heappop(heap)
        if v != version[stream]:
            continue  # superseded by a newer candidate of the same stream
        fresh = selector.candidate(stream)  # constraints that depend on other streams
        if fresh is None:
            continue
        if fresh.key != key:
            push(stream)
            continue
        unit, changed = selector.take(fresh)
        taken.append(unit)
        for s in changed:
            push(s)

    plan = selector.plan()
    after = plan.apply(arch).num_parameters()
    if after != selector.params:
        raise AssertionError(f"selection bookkeeping {selector.params} != plan.apply {after}")
    return Selection(plan, tuple(taken), before, after, target)

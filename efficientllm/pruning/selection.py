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
- hidden: `align` channels (hidden is replicated over TP), cheapest first, ranked as one unit
  but removed one channel at a time: once a unit is started its remaining channels go first,
  before anything else is ranked, at this and the following events, until the width is aligned
  again. One aligned hidden unit of a large model is hundreds of events' budgets (64 channels of
  SmolLM-1.7B: 53M parameters, 354 events); removed in pieces, the parameter count follows the
  schedule within one channel instead of dropping 53M at once. A unit is started only if it
  can be completed above the phase's final target, so the phase ends aligned. A width that is
  not a multiple of `align` to begin with is aligned first.
- layer (optional): one whole transformer block.

A unit's score is the sum of its groups' scores. Ranking sizes are taken from the Architecture
at the start of the event; the budget is checked with the exact parameter count. An event
overshoots its budget by less than its last unit, so the count after every event is within
`Selection.unit_bound` (the largest head/ffn unit, or one hidden channel) of the schedule. Ties break on
(value, kind head<ffn<hidden<layer, layer, unit shape, smallest index), and sums are exactly
rounded (math.fsum), so equal inputs give bit-identical plans.

`select_architecture` prunes once to a given Architecture with the same units, scores and
greedy core: instead of a budget, each unit is admitted only while it leaves every width at or
above the target's (`check_architecture_reachable` says up front whether the grid gets there).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
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


def scale_scores(scores: Mapping[str, Any], factors: Mapping[str, Any]) -> dict[str, Any]:
    """The score table with every group's score multiplied by its factor (`factors` shaped like
    the table, for some of its kinds: a tensor per layer, or one for hidden); the rest as is."""
    out = dict(scores)
    for kind, factor in factors.items():
        if kind not in scores:
            continue
        out[kind] = ([s * f for s, f in zip(scores[kind], factor)] if isinstance(factor, list)
                     else scores[kind] * factor)
    return out


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
    value: float  # the normalised score it was ranked by (a hidden piece: its aligned unit's)
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
    unit_bound: int = 0  # the largest removal one unit could make at this event
    # per kind: the lowest saliency per parameter its candidates offered (why the ranking chose)
    score_per_param: Mapping[str, float] = field(default_factory=dict)

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


def check_architecture_reachable(source: Architecture, target: Architecture, constraints: Constraints) -> None:
    """Raise ValueError naming the first width of `target` that `select_architecture` cannot
    reach from `source`: selection only removes, in its units (ffn in lcm(align, tp) channels,
    hidden in `align`, heads one per KV group or tp whole groups), above the minimums, and only
    the kinds `constraints.kinds` enables; every layer is kept."""
    c = constraints
    for name in ("vocab_size", "head_dim", "tie_embeddings", "num_layers"):
        if getattr(target, name) != getattr(source, name):
            raise ValueError(f"target {name} {getattr(target, name)} differs from the source's "
                             f"{getattr(source, name)}; pruning changes only hidden_size and per-layer widths")
    if c.max_ratio:
        raise ValueError(f"max_ratio {dict(c.max_ratio)} caps one event, but a target architecture is reached "
                         f"in one event; leave max_ratio unset")
    target.validate(c.tensor_parallel_size)

    def width(where: str, name: str, want: int, have: int, kind: str, unit: int, minimum: int) -> None:
        if want == have:
            return
        why = None
        if kind not in c.kinds:
            why = f"kind '{kind}' is not among the pruned kinds {list(c.kinds)}"
        elif want > have:
            why = "pruning only removes"
        elif want % unit:
            why = f"it must be a multiple of {unit} (align {c.align}, tensor_parallel_size {c.tensor_parallel_size})"
        elif want < max(minimum, 1):
            why = f"the minimum is {minimum}"
        if why:
            raise ValueError(f"target {where}{name} {want} is not reachable from the source's {have}: {why}")

    width("", "hidden_size", target.hidden_size, source.hidden_size, "hidden", c.hidden_unit, c.min_hidden)
    for l, (have, want) in enumerate(zip(source.layers, target.layers)):
        where = f"layer {l} "
        width(where, "ffn_hidden_size", want.ffn_hidden_size, have.ffn_hidden_size, "ffn", c.ffn_unit,
              c.min_ffn_per_layer)
        width(where, "num_query_groups", want.num_query_groups, have.num_query_groups, "head",
              c.tensor_parallel_size, max(c.min_query_groups, c.tensor_parallel_size))
        width(where, "heads per KV group", want.heads_per_group, have.heads_per_group, "head", 1, 1)
        width(where, "num_attention_heads", want.num_attention_heads, have.num_attention_heads, "head", 1,
              c.min_heads_per_layer)


# Parameters are exactly hidden_size * (model coefficient + sum of layer coefficients).
def _model_coefficient(arch: Architecture) -> int:
    return arch.vocab_size * (1 if arch.tie_embeddings else 2) + 1  # embeddings + final norm


def _layer_coefficient(head_dim: int, heads: int, groups: int, ffn: int) -> int:
    return head_dim * (2 * heads + 2 * groups) + 3 * ffn + 2  # qkv + proj, fc1 + fc2, norms


# -- scores -----------------------------------------------------------------------------------


def _as_floats(value: Any, width: int, what: str) -> list[float]:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)  # cpu-ok: the ranking runs on the host
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
        phase_target: int | None = None,
    ) -> None:
        c = self.c = constraints
        self.phase_target = phase_target
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

        def by_score(values: list[float], indices: range) -> list[int]:
            """`indices` (a contiguous range) cheapest first; ties stay in index order."""
            order = np.argsort(np.asarray(values[indices.start: indices.stop]), kind="stable")
            return (order + indices.start).tolist()

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
        self.params = self.params_at_start = self._params()
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
            step = _step(self.h, c.hidden_unit)  # the channels that complete an aligned unit
            if not _step_allowed(self.h, step, c.min_hidden):
                return None
            if len(self.removed_hidden) + 1 > self.hidden_cap:
                return None
            starting = not self.hidden_in_progress()
            per_channel = self.params // self.h
            if starting and self.phase_target is not None and self.params - step * per_channel < self.phase_target:
                return None  # it could not be completed before the phase ends
            picks = self.hidden_queue[:step]
            ranked = self._unit("hidden", 0, picks, (self.hidden_scores[ch] for ch in picks),
                                step * self.sizes.hidden, step)
            first = picks[0]
            return Unit("hidden", 0, (first,), self.hidden_scores[first], self.sizes.hidden, 1, ranked.value)
        if kind == "layer":
            left = sum(self.alive)
            if not self.alive[l] or left - 1 < max(c.min_layers, 1):
                return None
            if len(self.removed_layers) + 1 > self.layer_cap:
                return None
            return self._unit("layer", l, [l], [self.layer_scores[l]], self.sizes.layers[l], 1)
        raise AssertionError(kind)

    def hidden_in_progress(self) -> bool:
        """A hidden unit is started and not complete (or the width began unaligned)."""
        return "hidden" in self.kinds and self.h % self.c.hidden_unit != 0

    def offers(self) -> tuple[int, dict[str, float]]:
        """Before anything is taken: the largest removal one unit can make (a head/ffn unit, or
        one hidden channel; whole layers are not bounded) and, per kind, the lowest saliency per
        removed parameter its candidates offer (raw score / size, whatever the normalisation)."""
        bound, cheapest = 0, {}
        for stream in self.streams():
            unit = self.candidate(stream)
            if unit is None:
                continue
            family = _UNIT_FAMILY[unit.kind]
            if family != "layer":
                bound = max(bound, unit.size)
            cheapest[family] = min(cheapest.get(family, math.inf), unit.score / unit.size)
        return bound, cheapest

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
    phase_target: int | None = None,
) -> Selection:
    """Remove the cheapest units until at least `budget_params` parameters are gone.

    `scores` maps kind to global saliencies: "head" and "ffn" per layer (a sequence or
    {layer: tensor}, each [num_attention_heads] in global head order / [ffn_hidden_size]),
    "hidden" a tensor [hidden_size], "layer" a tensor [num_layers]; optionally "kv_group" per
    layer [num_query_groups], the saliency of each group's k/v rows, added to a whole-group
    removal (missing: those rows count as free). Only the kinds enabled in `constraints.kinds`
    are read. Stops as soon as the budget is met (overshooting by less than
    the last unit); if the constraints run out first, returns everything allowed with
    `Selection.met` False and the `shortfall`. `phase_target`, the parameter count the whole
    pruning phase ends at, keeps a hidden unit from being started that could not be completed.
    """
    constraints = constraints or Constraints()
    selector = _Selector(arch, scores, constraints, normalisation, phase_target)
    bound, cheapest = selector.offers()
    before = selector.params
    target = before - int(budget_params)
    taken = _take_cheapest(selector, admits=lambda unit: True, stop=lambda: selector.params <= target)
    plan = selector.plan()
    after = plan.apply(arch).num_parameters()
    if after != selector.params:
        raise AssertionError(f"selection bookkeeping {selector.params} != plan.apply {after}")
    return Selection(plan, tuple(taken), before, after, target, bound, cheapest)


def select_architecture(
    arch: Architecture,
    scores: Mapping[str, Any],
    target: Architecture,
    constraints: Constraints | None = None,
    normalisation: Normalisation = "per_parameter",
) -> Selection:
    """Prune once to a given Architecture (LLM-Pruner's and Minitron's one-shot pruning): within
    each layer the least salient heads, KV groups and FFN channels go, and the least salient
    hidden channels of the model, until every width is `target`'s.

    The same scores, units and normalisation as `select`; only which units may be taken
    differs: any unit that leaves every width at or above the target's, cheapest first, until
    none is left (inside a layer, whether a head from every group or whole KV groups go next is
    decided by their normalised scores). Raises ValueError naming the first width the
    constraints cannot reach (`check_architecture_reachable`)."""
    constraints = constraints or Constraints()
    check_architecture_reachable(arch, target, constraints)
    selector = _Selector(arch, scores, constraints, normalisation)
    bound, cheapest = selector.offers()
    tp = constraints.tensor_parallel_size

    def toward_target(unit: Unit) -> bool:
        l, want = unit.layer, target.layers[unit.layer]
        if unit.kind == "head":
            return selector.hpg[l] - 1 >= want.heads_per_group
        if unit.kind == "kv_group":
            return len(selector.groups_alive[l]) - tp >= want.num_query_groups
        if unit.kind == "ffn":
            return selector.ffn[l] - len(unit.indices) >= want.ffn_hidden_size
        if unit.kind == "hidden":
            return selector.h - len(unit.indices) >= target.hidden_size
        return False  # a target keeps every layer

    taken = _take_cheapest(selector, admits=toward_target, stop=lambda: False)
    plan = selector.plan()
    if plan.apply(arch) != target:
        raise AssertionError(f"selection ended at {plan.apply(arch)}, not at the target {target}")
    return Selection(plan, tuple(taken), selector.params_at_start, selector.params,
                     target.num_parameters(), bound, cheapest)


def _take_cheapest(selector: _Selector, admits: Callable[[Unit], bool], stop: Callable[[], bool]) -> list[Unit]:
    """The greedy core of both selections: until `stop()` or no admitted unit is left, take the
    cheapest admitted unit; a started hidden unit's next channel goes before anything is ranked."""
    heap: list[tuple[tuple, tuple[str, int], int, Unit]] = []
    version: dict[tuple[str, int], int] = {}
    taken: list[Unit] = []

    def push(stream: tuple[str, int]) -> None:
        version[stream] = version.get(stream, 0) + 1
        unit = selector.candidate(stream)
        if unit is not None and admits(unit):
            heapq.heappush(heap, (unit.key, stream, version[stream], unit))

    def take(unit: Unit) -> None:
        unit, changed = selector.take(unit)
        taken.append(unit)
        for s in changed:
            push(s)

    for stream in selector.streams():
        push(stream)
    while not stop() and heap:
        piece = selector.candidate(("hidden", 0)) if selector.hidden_in_progress() else None
        if piece is not None and admits(piece):
            take(piece)
            continue
        key, stream, v, unit = heapq.heappop(heap)
        if v != version[stream]:
            continue  # superseded by a newer candidate of the same stream
        fresh = selector.candidate(stream)  # constraints that depend on other streams
        if fresh is None or not admits(fresh):
            continue
        if fresh.key != key:
            push(stream)
            continue
        take(fresh)
    return taken

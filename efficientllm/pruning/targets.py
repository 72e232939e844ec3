"""Target architectures for pruning once (`prune.target_architecture`), and a uniform one
proposed for a parameter count (the direct-pretraining baseline of the same size, or the
target of prune-then-train).

Both only shrink the source, on the selection's grid (`Constraints`), so that
`selection.select_architecture` can reach them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.pruning.selection import Constraints, check_architecture_reachable

LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerWidths))
TARGET_FIELDS = ("hidden_size", *LAYER_FIELDS, "layers")


def target_from_spec(source: Architecture, spec: Mapping[str, Any]) -> Architecture:
    """`source` with the widths `spec` names: `hidden_size`, and either the uniform per-layer
    fields (num_attention_heads, num_query_groups, ffn_hidden_size) or `layers`, one
    {num_attention_heads, num_query_groups, ffn_hidden_size} per layer. A width left out keeps
    the source's (per layer)."""
    unknown = sorted(set(spec) - set(TARGET_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; valid: {', '.join(TARGET_FIELDS)}")
    if "layers" in spec:
        if len(spec["layers"]) != source.num_layers:
            raise ValueError(f"layers lists {len(spec['layers'])} layers, the source has {source.num_layers}")
        layers = tuple(LayerWidths(**{f: int(widths[f]) for f in LAYER_FIELDS}) for widths in spec["layers"])
    else:
        layers = tuple(dataclasses.replace(l, **{f: int(spec[f]) for f in LAYER_FIELDS if f in spec})
                       for l in source.layers)
    return dataclasses.replace(source, hidden_size=int(spec.get("hidden_size", source.hidden_size)), layers=layers)


def as_target_spec(arch: Architecture) -> dict[str, Any]:
    """`arch`'s widths as a `prune.target_architecture` mapping (the inverse of
    `target_from_spec`): the uniform fields when every layer is alike, else `layers`."""
    if arch.is_uniform:
        return {"hidden_size": arch.hidden_size, **dataclasses.asdict(arch.layers[0])}
    return {"hidden_size": arch.hidden_size, "layers": [dataclasses.asdict(l) for l in arch.layers]}


def _on_grid(scaled: float, have: int, unit: int, minimum: int) -> int:
    """The width nearest `scaled` that pruning `have` can reach: a multiple of `unit` at or
    above the minimum, or `have` itself."""
    lowest = -(-max(minimum, 1) // unit) * unit
    width = max(lowest, round(scaled / unit) * unit)
    return have if width >= have else width


def _heads_on_grid(scaled: float, have: LayerWidths, c: Constraints) -> tuple[int, int]:
    """(query groups, heads per group) nearest `scaled` heads, reachable from `have`; ties keep
    more groups (heads go one per group first, as the selection prefers at equal saliency)."""
    tp = c.tensor_parallel_size
    groups = [g for g in range(tp, have.num_query_groups + 1, tp)
              if g == have.num_query_groups or g >= max(tp, c.min_query_groups)]
    options = [(g, p) for g in groups for p in range(1, have.heads_per_group + 1)
               if g * p >= c.min_heads_per_layer or (g, p) == (have.num_query_groups, have.heads_per_group)]
    return min(options, key=lambda o: (abs(o[0] * o[1] - scaled), -o[0]))


def scaled_uniform(source: Architecture, factor: float, constraints: Constraints) -> Architecture:
    """`source` (uniform) with hidden size, query heads and FFN channels each scaled by `factor`
    and put on the selection's grid; kinds `constraints.kinds` does not prune are kept."""
    c, kinds, layer = constraints, set(constraints.kinds), source.layers[0]
    hidden, heads, ffn = source.hidden_size, (layer.num_query_groups, layer.heads_per_group), layer.ffn_hidden_size
    if "hidden" in kinds:
        hidden = _on_grid(factor * hidden, hidden, c.hidden_unit, c.min_hidden)
    if "head" in kinds:
        heads = _heads_on_grid(factor * layer.num_attention_heads, layer, c)
    if "ffn" in kinds:
        ffn = _on_grid(factor * ffn, ffn, c.ffn_unit, c.min_ffn_per_layer)
    widths = LayerWidths(heads[0] * heads[1], heads[0], ffn)
    return dataclasses.replace(source, hidden_size=hidden, layers=(widths,) * source.num_layers)


def propose_uniform(source: Architecture, target_params: int, constraints: Constraints,
                    steps: int = 2000) -> Architecture:
    """A uniform Architecture reachable by pruning `source` once, with about `target_params`
    parameters: of the common scale factors k/steps of hidden size, heads and FFN channels
    (`scaled_uniform`), the one whose parameter count is closest (ties: the larger one)."""
    if not source.is_uniform:
        raise ValueError("propose_uniform needs a uniform source architecture")
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")
    candidates = {scaled_uniform(source, k / steps, constraints) for k in range(1, steps + 1)}
    best = min(candidates, key=lambda a: (abs(a.num_parameters() - target_params), -a.num_parameters()))
    check_architecture_reachable(source, best, constraints)
    return best

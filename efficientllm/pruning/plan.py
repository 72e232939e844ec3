"""The Plan: the groups one pruning event removes, identical on every rank.

Every index refers to the Architecture the event started from: global query-head indices and
FFN-channel indices per layer (layer numbers before any layer is removed), hidden channels,
whole layers. A Plan is canonical (sorted, de-duplicated, empty entries dropped), so equal plans
serialise to equal bytes and have equal checksums in every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.pruning.layout import LayerLayout

KINDS = ("head", "ffn", "hidden", "layer")

LayerIndices = tuple[tuple[int, tuple[int, ...]], ...]
LayerIndicesLike = Union[Mapping[int, Iterable[int]], Iterable[tuple[int, Iterable[int]]]]


def _as_index(value: Any, what: str) -> int:
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{what} index must be an integer, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{what} index must be >= 0, got {value}")
    return value


def _canonical_indices(values: Iterable[int], what: str) -> tuple[int, ...]:
    if torch.is_tensor(values):
        values = values.tolist()
    return tuple(sorted({_as_index(v, what) for v in values}))


def _canonical_layer_map(value: LayerIndicesLike, what: str) -> LayerIndices:
    items = value.items() if isinstance(value, Mapping) else value
    merged: dict[int, set[int]] = {}
    for layer, indices in items:
        merged.setdefault(_as_index(layer, "layer"), set()).update(
            _canonical_indices(indices, what)
        )
    return tuple((l, tuple(sorted(s))) for l, s in sorted(merged.items()) if s)


@dataclass(frozen=True)
class Plan:
    """What one pruning event removes. Construct with dicts or pairs; stored canonically."""

    heads: LayerIndices = ()  # (layer, global query heads) pairs
    ffn: LayerIndices = ()  # (layer, ffn channels) pairs
    hidden: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _canonical_layer_map(self.heads, "head"))
        object.__setattr__(self, "ffn", _canonical_layer_map(self.ffn, "ffn channel"))
        object.__setattr__(self, "hidden", _canonical_indices(self.hidden, "hidden channel"))
        object.__setattr__(self, "layers", _canonical_indices(self.layers, "layer"))

    # -- reading ----------------------------------------------------------------------------
    def removed_heads(self, layer: int) -> tuple[int, ...]:
        return dict(self.heads).get(layer, ())

    def removed_ffn(self, layer: int) -> tuple[int, ...]:
        return dict(self.ffn).get(layer, ())

    @property
    def is_empty(self) -> bool:
        return not (self.heads or self.ffn or self.hidden or self.layers)

    def counts(self) -> dict[str, int]:
        """Groups removed per kind (for logs)."""
        return {
            "head": sum(len(v) for _, v in self.heads),
            "ffn": sum(len(v) for _, v in self.ffn),
            "hidden": len(self.hidden),
            "layer": len(self.layers),
        }

    def removed_groups(self, arch: Architecture, layer: int) -> list[int]:
        """KV groups of `layer` that lose all their heads (and so their k/v rows)."""
        return LayerLayout.of(arch, layer).removed_groups(self.removed_heads(layer))

    def union(self, other: "Plan") -> "Plan":
        """Both plans' removals (both must refer to the same Architecture)."""
        return Plan(
            heads=self.heads + other.heads,
            ffn=self.ffn + other.ffn,
            hidden=self.hidden + other.hidden,
            layers=self.layers + other.layers,
        )

    # -- effect on the Architecture ---------------------------------------------------------
    def apply(self, arch: Architecture) -> Architecture:
        """The Architecture after the removal. Raises ValueError for an index out of range, a
        head removal that leaves KV groups with unequal numbers of heads, or an empty width."""
        num_layers = arch.num_layers
        for l in self.layers:
            if l >= num_layers:
                raise ValueError(f"plan removes layer {l}, the model has {num_layers}")
        if len(self.layers) >= num_layers:
            raise ValueError(f"plan removes all {num_layers} layers")
        for what, entries in (("heads", self.heads), ("ffn", self.ffn)):
            for l, _ in entries:
                if l >= num_layers:
                    raise ValueError(
                        f"plan removes {what} of layer {l}, the model has {num_layers}"
                    )
        if self.hidden and self.hidden[-1] >= arch.hidden_size:
            raise ValueError(
                f"hidden channel {self.hidden[-1]} out of range [0, {arch.hidden_size})"
            )
        if len(self.hidden) >= arch.hidden_size:
            raise ValueError(f"plan removes all {arch.hidden_size} hidden channels")

        layers = []
        for l, widths in enumerate(arch.layers):
            if l in self.layers:
                continue
            widths = _remove_heads(widths, self.removed_heads(l), l)
            removed_ffn = self.removed_ffn(l)
            if removed_ffn and removed_ffn[-1] >= widths.ffn_hidden_size:
                raise ValueError(
                    f"layer {l}: ffn channel {removed_ffn[-1]} out of range "
                    f"[0, {widths.ffn_hidden_size})"
                )
            if len(removed_ffn) >= widths.ffn_hidden_size:
                raise ValueError(
                    f"layer {l}: plan removes all {widths.ffn_hidden_size} ffn channels"
                )
            layers.append(
                dataclasses.replace(
                    widths, ffn_hidden_size=widths.ffn_hidden_size - len(removed_ffn)
                )
            )
        new = dataclasses.replace(
            arch, hidden_size=arch.hidden_size - len(self.hidden), layers=tuple(layers)
        )
        new.validate()
        return new

    def validate(self, arch: Architecture, tensor_parallel_size: int = 1) -> Architecture:
        """Check the plan can be carried out on shards: apply() succeeds, every TP rank loses
        the same number of KV groups and FFN channels per layer, and the result is buildable
        at this TP size. Returns the new Architecture."""
        tp = tensor_parallel_size
        new = self.apply(arch)
        for l in range(arch.num_layers):
            if l in self.layers:
                continue
            layout = LayerLayout.of(arch, l, tp)
            groups = layout.removed_groups(self.removed_heads(l))
            per_rank = [sum(layout.rank_of_group(g) == r for g in groups) for r in range(tp)]
            if len(set(per_rank)) > 1:
                raise ValueError(
                    f"layer {l}: KV groups removed per TP rank are unbalanced: {per_rank}"
                )
            per_rank = [
                sum(layout.rank_of_ffn(c) == r for c in self.removed_ffn(l)) for r in range(tp)
            ]
            if len(set(per_rank)) > 1:
                raise ValueError(
                    f"layer {l}: ffn channels removed per TP rank are unbalanced: {per_rank}"
                )
        new.validate(tp)
        return new

    def removed_parameters(self, arch: Architecture) -> int:
        return arch.num_parameters() - self.apply(arch).num_parameters()

    def describe(self, arch: Architecture) -> str:
        """One log line: what goes and what the parameter count becomes."""
        counts = self.counts()
        groups = sum(
            len(self.removed_groups(arch, l)) for l, _ in self.heads if l not in self.layers
        )
        before, after = arch.num_parameters(), self.apply(arch).num_parameters()
        return (
            f"prune {counts['head']} heads ({groups} KV groups), {counts['ffn']} ffn channels, "
            f"{counts['hidden']} hidden channels, {counts['layer']} layers: "
            f"{before:,} -> {after:,} parameters ({(after - before) / before:+.2%})"
        )

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [[l, list(v)] for l, v in self.heads],
            "ffn": [[l, list(v)] for l, v in self.ffn],
            "hidden": list(self.hidden),
            "layers": list(self.layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        unknown = set(data) - {"heads", "ffn", "hidden", "layers"}
        if unknown:
            raise ValueError(f"malformed plan record: unknown keys {sorted(unknown)}")
        try:
            return cls(
                heads=[(l, v) for l, v in data.get("heads", ())],
                ffn=[(l, v) for l, v in data.get("ffn", ())],
                hidden=data.get("hidden", ()),
                layers=data.get("layers", ()),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed plan record: {err}") from err

    def to_json(self) -> str:
        """Canonical: equal plans give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def checksum(self) -> int:
        """A 63-bit digest of the canonical JSON (fits a signed int64 tensor for all-reduce);
        the same in every process, unlike hash()."""
        digest = hashlib.sha256(self.to_json().encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") >> 1


def _remove_heads(widths: LayerWidths, removed: tuple[int, ...], layer: int) -> LayerWidths:
    if not removed:
        return widths
    nh, ng, hpg = widths.num_attention_heads, widths.num_query_groups, widths.heads_per_group
    if removed[-1] >= nh:
        raise ValueError(f"layer {layer}: head {removed[-1]} out of range [0, {nh})")
    per_group = [0] * ng
    for k in removed:
        per_group[k // hpg] += 1
    surviving = [n for n in per_group if n < hpg]
    if not surviving:
        raise ValueError(f"layer {layer}: plan removes all {nh} heads")
    if len(set(surviving)) > 1:
        raise ValueError(
            f"layer {layer}: removing heads {list(removed)} leaves KV groups with unequal "
            f"numbers of query heads (GQA needs the same number in every group): "
            f"removed per group {per_group}"
        )
    new_groups, new_hpg = len(surviving), hpg - surviving[0]
    return dataclasses.replace(
        widths, num_attention_heads=new_groups * new_hpg, num_query_groups=new_groups
    )


def kind_totals(arch: Architecture) -> dict[str, int]:
    """Total width of each kind: all query heads, all FFN channels, hidden size, layers."""
    return {
        "head": sum(l.num_attention_heads for l in arch.layers),
        "ffn": sum(l.ffn_hidden_size for l in arch.layers),
        "hidden": arch.hidden_size,
        "layer": arch.num_layers,
    }


def pruning_ratios(source: Architecture, current: Architecture) -> dict[str, float]:
    """Fraction of each kind pruned so far (plus "params"), for logs."""
    before, after = kind_totals(source), kind_totals(current)
    ratios = {k: 1.0 - after[k] / before[k] for k in KINDS}
    ratios["params"] = 1.0 - current.num_parameters() / source.num_parameters()
    return ratios

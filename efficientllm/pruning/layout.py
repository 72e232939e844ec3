"""Where a pruning group's parameters live in megatron-core's tensor-parallel shards.

Plain index arithmetic, no process groups. Megatron-core's layouts, per layer (t = TP size):

- `linear_qkv.weight` [(nh + 2*ng)*d, h]: rows grouped per KV group g; each group's block is
  [its hpg query heads (d rows each), then k (d rows), then v (d rows)]. Rank r holds the
  contiguous groups r*ng/t .. (r+1)*ng/t - 1, in the same per-group layout.
  Global query head index = g*hpg + j.
- `linear_proj.weight` [h, nh*d]: columns in global head order; a rank holds its own heads'.
- `linear_fc1.weight` [2f, h] (SwiGLU): a rank's shard is [gate rows of its f/t channels;
  up rows of its f/t channels]. Global channel c lives on rank c // (f/t).
- `linear_fc2.weight` [h, f]: columns sharded contiguously.
- Hidden channels are replicated over TP.

Every "local" index returned here indexes the shard of the rank that owns the group (at t = 1,
the full tensor). The `kept_*` functions give what surgery slices a shard with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from efficientllm.architecture import Architecture, LayerWidths


def _index_set(removed: Iterable[int], size: int, what: str) -> set[int]:
    if torch.is_tensor(removed):
        removed = removed.tolist()
    out = set()
    for i in removed:
        i = int(i)
        if not 0 <= i < size:
            raise ValueError(f"{what} index {i} out of range [0, {size})")
        out.add(i)
    return out


def _long(values: Iterable[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)  # cpu-ok: host index arithmetic, moved to the weights' device where used


def _span(start: int, stop: int) -> torch.Tensor:
    return _long(range(start, stop))


def complement(size: int, removed: Iterable[int]) -> torch.Tensor:
    """The sorted indices in range(size) that are not in `removed` (a LongTensor)."""
    gone = _index_set(removed, size, "removed")
    return _long(i for i in range(size) if i not in gone)


def kept_hidden(arch: Architecture, removed: Iterable[int]) -> torch.Tensor:
    """Kept hidden channels: slices embedding columns, norm weights, the input columns of
    linear_qkv / linear_fc1 / output layer and the output rows of linear_proj / linear_fc2
    (identically on every TP rank: hidden channels are replicated)."""
    return complement(arch.hidden_size, removed)


@dataclass(frozen=True)
class GroupSizes:
    """Parameters removed with one group of each kind (from the Architecture's widths)."""

    head: int  # one query head: its d rows of linear_qkv and d columns of linear_proj
    kv_group: int  # the k and v rows of a KV group, removed with its last head
    ffn: int  # one FFN channel: gate row, up row, fc2 column
    hidden: int  # one residual channel, everything that touches it
    layers: tuple[int, ...]  # one whole transformer block, per layer

    @classmethod
    def of(cls, arch: Architecture) -> "GroupSizes":
        h, d = arch.hidden_size, arch.head_dim
        embeddings = arch.vocab_size * (1 if arch.tie_embeddings else 2)
        final_norm = 1
        per_layer = sum(
            d * (l.num_attention_heads + 2 * l.num_query_groups)  # linear_qkv input column
            + l.num_attention_heads * d  # linear_proj output row
            + 3 * l.ffn_hidden_size  # linear_fc1 input column (2f) + linear_fc2 output row (f)
            + 2  # the two norm weights
            for l in arch.layers
        )
        return cls(
            head=2 * d * h,
            kv_group=2 * d * h,
            ffn=3 * h,
            hidden=embeddings + final_norm + per_layer,
            layers=tuple(arch.layer_parameters(l) for l in arch.layers),
        )


def group_sizes(arch: Architecture) -> GroupSizes:
    return GroupSizes.of(arch)


@dataclass(frozen=True)
class LayerLayout:
    """One layer's heads and FFN channels located in its TP shards."""

    widths: LayerWidths
    head_dim: int
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        w, tp = self.widths, self.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if w.num_attention_heads % w.num_query_groups:
            raise ValueError(f"{w}: heads not divisible by query groups")
        for name in ("num_query_groups", "ffn_hidden_size"):
            if getattr(w, name) % tp:
                raise ValueError(f"{name} {getattr(w, name)} is not divisible by TP size {tp}")

    @classmethod
    def of(cls, arch: Architecture, layer: int, tensor_parallel_size: int = 1) -> "LayerLayout":
        return cls(arch.layers[layer], arch.head_dim, tensor_parallel_size)

    # -- shard sizes ------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.widths.heads_per_group

    @property
    def groups_per_rank(self) -> int:
        return self.widths.num_query_groups // self.tensor_parallel_size

    @property
    def heads_per_rank(self) -> int:
        return self.widths.num_attention_heads // self.tensor_parallel_size

    @property
    def ffn_per_rank(self) -> int:
        return self.widths.ffn_hidden_size // self.tensor_parallel_size

    @property
    def qkv_rows_per_group(self) -> int:
        return (self.heads_per_group + 2) * self.head_dim

    # -- owners -----------------------------------------------------------------------------
    def _check(self, index: int, size: int, what: str) -> int:
        index = int(index)
        if not 0 <= index < size:
            raise ValueError(f"{what} {index} out of range [0, {size})")
        return index

    def group_of_head(self, head: int) -> int:
        head = self._check(head, self.widths.num_attention_heads, "head")
        return head // self.heads_per_group

    def heads_of_group(self, group: int) -> range:
        group = self._check(group, self.widths.num_query_groups, "group")
        return range(group * self.heads_per_group, (group + 1) * self.heads_per_group)

    def rank_of_group(self, group: int) -> int:
        group = self._check(group, self.widths.num_query_groups, "group")
        return group // self.groups_per_rank

    def rank_of_head(self, head: int) -> int:
        return self.rank_of_group(self.group_of_head(head))

    def rank_of_ffn(self, channel: int) -> int:
        channel = self._check(channel, self.widths.ffn_hidden_size, "ffn channel")
        return channel // self.ffn_per_rank

    def groups_on_rank(self, rank: int) -> range:
        rank = self._check(rank, self.tensor_parallel_size, "rank")
        return range(rank * self.groups_per_rank, (rank + 1) * self.groups_per_rank)

    def heads_on_rank(self, rank: int) -> range:
        rank = self._check(rank, self.tensor_parallel_size, "rank")
        return range(rank * self.heads_per_rank, (rank + 1) * self.heads_per_rank)

    def ffn_on_rank(self, rank: int) -> range:
        rank = self._check(rank, self.tensor_parallel_size, "rank")
        return range(rank * self.ffn_per_rank, (rank + 1) * self.ffn_per_rank)

    # -- local indices of one group (on its owner rank) -------------------------------------
    def _group_offset(self, group: int) -> int:
        return (group % self.groups_per_rank) * self.qkv_rows_per_group

    def qkv_query_rows(self, head: int) -> torch.Tensor:
        """Local rows of linear_qkv holding query head `head` (d rows)."""
        group = self.group_of_head(head)
        j = head % self.heads_per_group
        start = self._group_offset(group) + j * self.head_dim
        return _span(start, start + self.head_dim)

    def qkv_key_value_rows(self, group: int) -> torch.Tensor:
        """Local rows of linear_qkv holding KV group `group`'s key then value (2d rows)."""
        group = self._check(group, self.widths.num_query_groups, "group")
        start = self._group_offset(group) + self.heads_per_group * self.head_dim
        return _span(start, start + 2 * self.head_dim)

    def proj_columns(self, head: int) -> torch.Tensor:
        """Local columns of linear_proj that read query head `head` (d columns)."""
        head = self._check(head, self.widths.num_attention_heads, "head")
        start = (head % self.heads_per_rank) * self.head_dim
        return _span(start, start + self.head_dim)

    def fc1_rows(self, channel: int) -> torch.Tensor:
        """Local rows of linear_fc1 of FFN channel `channel`: [gate row, up row]."""
        channel = self._check(channel, self.widths.ffn_hidden_size, "ffn channel")
        local = channel % self.ffn_per_rank
        return _long((local, self.ffn_per_rank + local))

    def fc2_column(self, channel: int) -> int:
        """Local column of linear_fc2 that reads FFN channel `channel`."""
        channel = self._check(channel, self.widths.ffn_hidden_size, "ffn channel")
        return channel % self.ffn_per_rank

    # -- what a rank keeps after a removal --------------------------------------------------
    def removed_groups(self, removed_heads: Iterable[int]) -> list[int]:
        """KV groups all of whose query heads are removed (their k/v rows go too)."""
        gone = _index_set(removed_heads, self.widths.num_attention_heads, "head")
        return [
            g
            for g in range(self.widths.num_query_groups)
            if all(k in gone for k in self.heads_of_group(g))
        ]

    def kept_qkv_rows(self, rank: int, removed_heads: Iterable[int]) -> torch.Tensor:
        """Local rows of rank's linear_qkv shard that survive removing `removed_heads`."""
        gone = _index_set(removed_heads, self.widths.num_attention_heads, "head")
        rows: list[torch.Tensor] = []
        for g in self.groups_on_rank(rank):
            kept = [k for k in self.heads_of_group(g) if k not in gone]
            if not kept:
                continue
            rows.extend(self.qkv_query_rows(k) for k in kept)
            rows.append(self.qkv_key_value_rows(g))
        return torch.cat(rows) if rows else _long(())

    def kept_proj_columns(self, rank: int, removed_heads: Iterable[int]) -> torch.Tensor:
        """Local columns of rank's linear_proj shard that survive removing `removed_heads`."""
        gone = _index_set(removed_heads, self.widths.num_attention_heads, "head")
        cols = [self.proj_columns(k) for k in self.heads_on_rank(rank) if k not in gone]
        return torch.cat(cols) if cols else _long(())

    def kept_fc1_rows(self, rank: int, removed_channels: Iterable[int]) -> torch.Tensor:
        """Local rows of rank's linear_fc1 shard that survive: [kept gate rows; kept up rows]."""
        local = self.kept_fc2_columns(rank, removed_channels)
        return torch.cat([local, local + self.ffn_per_rank])

    def kept_fc2_columns(self, rank: int, removed_channels: Iterable[int]) -> torch.Tensor:
        """Local columns of rank's linear_fc2 shard that survive removing `removed_channels`."""
        gone = _index_set(removed_channels, self.widths.ffn_hidden_size, "ffn channel")
        return _long(c % self.ffn_per_rank for c in self.ffn_on_rank(rank) if c not in gone)

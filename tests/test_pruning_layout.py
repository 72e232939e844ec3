"""Layout indices checked against brute-force megatron-style full tensors and their TP shards."""

import dataclasses

import pytest
import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.pruning.layout import GroupSizes, LayerLayout, complement, kept_hidden
from efficientllm.pruning.plan import Plan

HEAD_DIM = 4
HIDDEN = 6
Q, K, V, GATE, UP = 1, 2, 3, 4, 5


def code(tag: int, index: int, i: int) -> int:
    """A recognisable row/column label: which tensor part, which head/group/channel, which row."""
    return tag * 1_000_000 + index * 1_000 + i


def full_qkv(heads: list[list[int]]) -> torch.Tensor:
    """linear_qkv.weight [(nh + 2 ng) d, h] built from scratch: `heads[g]` are the query heads of
    KV group g (by their original label); row r carries code(...) * 100 + column."""
    labels = []
    for g, group_heads in enumerate(heads):
        for head in group_heads:
            labels += [code(Q, head, i) for i in range(HEAD_DIM)]
        labels += [code(K, g, i) for i in range(HEAD_DIM)]
        labels += [code(V, g, i) for i in range(HEAD_DIM)]
    return torch.tensor(labels)[:, None] * 100 + torch.arange(HIDDEN)


def full_proj(heads: list[int]) -> torch.Tensor:
    """linear_proj.weight [h, nh d], columns in global head order."""
    labels = [code(Q, head, i) for head in heads for i in range(HEAD_DIM)]
    return torch.arange(HIDDEN)[:, None] + 100 * torch.tensor(labels)


def fc1_shards(channels: list[int], tp: int) -> list[torch.Tensor]:
    """Per-rank linear_fc1.weight shards: [gate rows of the rank's channels; their up rows]."""
    per_rank = len(channels) // tp
    shards = []
    for r in range(tp):
        mine = channels[r * per_rank : (r + 1) * per_rank]
        labels = [code(GATE, c, 0) for c in mine] + [code(UP, c, 0) for c in mine]
        shards.append(torch.tensor(labels)[:, None] * 100 + torch.arange(HIDDEN))
    return shards


def fc2_shards(channels: list[int], tp: int) -> list[torch.Tensor]:
    full = torch.arange(HIDDEN)[:, None] + 100 * torch.tensor(channels)
    return list(torch.chunk(full, tp, dim=1))


def row_shards(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Megatron's ColumnParallelLinear: contiguous equal blocks of output rows."""
    return list(torch.chunk(full, tp, dim=0))


def grouped_heads(widths: LayerWidths) -> list[list[int]]:
    hpg = widths.heads_per_group
    return [list(range(g * hpg, (g + 1) * hpg)) for g in range(widths.num_query_groups)]


WIDTHS = LayerWidths(num_attention_heads=12, num_query_groups=4, ffn_hidden_size=16)
TP_SIZES = (1, 2, 4)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_qkv_query_rows_are_the_heads_rows_on_its_owner_rank(tp):
    layout = LayerLayout(WIDTHS, HEAD_DIM, tp)
    shards = row_shards(full_qkv(grouped_heads(WIDTHS)), tp)
    for head in range(WIDTHS.num_attention_heads):
        rows = shards[layout.rank_of_head(head)][layout.qkv_query_rows(head)]
        expected = torch.tensor([code(Q, head, i) for i in range(HEAD_DIM)])
        assert torch.equal(rows[:, 0] // 100, expected)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_qkv_key_value_rows_are_the_groups_k_then_v_rows(tp):
    layout = LayerLayout(WIDTHS, HEAD_DIM, tp)
    shards = row_shards(full_qkv(grouped_heads(WIDTHS)), tp)
    for group in range(WIDTHS.num_query_groups):
        rows = shards[layout.rank_of_group(group)][layout.qkv_key_value_rows(group)]
        expected = [code(K, group, i) for i in range(HEAD_DIM)]
        expected += [code(V, group, i) for i in range(HEAD_DIM)]
        assert torch.equal(rows[:, 0] // 100, torch.tensor(expected))


@pytest.mark.parametrize("tp", TP_SIZES)
def test_proj_columns_are_the_heads_columns_on_its_owner_rank(tp):
    layout = LayerLayout(WIDTHS, HEAD_DIM, tp)
    shards = list(torch.chunk(full_proj(list(range(WIDTHS.num_attention_heads))), tp, dim=1))
    for head in range(WIDTHS.num_attention_heads):
        cols = shards[layout.rank_of_head(head)][:, layout.proj_columns(head)]
        expected = torch.tensor([code(Q, head, i) for i in range(HEAD_DIM)])
        assert torch.equal(cols[0] // 100, expected)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_fc1_rows_are_gate_then_up_and_fc2_column_reads_the_channel(tp):
    layout = LayerLayout(WIDTHS, HEAD_DIM, tp)
    channels = list(range(WIDTHS.ffn_hidden_size))
    fc1, fc2 = fc1_shards(channels, tp), fc2_shards(channels, tp)
    for c in channels:
        rank = layout.rank_of_ffn(c)
        rows = fc1[rank][layout.fc1_rows(c)]
        assert (rows[:, 0] // 100).tolist() == [code(GATE, c, 0), code(UP, c, 0)]
        assert fc2[rank][0, layout.fc2_column(c)] // 100 == c


def test_owners_follow_contiguous_blocks_of_groups_and_channels():
    layout = LayerLayout(WIDTHS, HEAD_DIM, 2)
    assert [layout.rank_of_head(k) for k in range(12)] == [0] * 6 + [1] * 6
    assert [layout.rank_of_group(g) for g in range(4)] == [0, 0, 1, 1]
    assert [layout.rank_of_ffn(c) for c in range(16)] == [0] * 8 + [1] * 8


# (tp, removed heads, removed ffn channels); every removal is GQA-consistent and TP-balanced.
REMOVALS = [
    (1, [], [3, 12]),
    (1, [3, 4, 5], [0, 1]),  # group 1 whole
    (1, [0, 5, 7, 11], [2, 9, 10, 15]),  # one head from every group
    (2, [], [3, 12]),
    (2, [3, 4, 5, 6, 7, 8], []),  # groups 1 and 2 whole: one per rank
    (2, [0, 5, 7, 11], [2, 5, 10, 15]),  # one head from every group
    (2, [3, 4, 5, 6, 7, 8, 1, 11], list(range(0, 16, 2))),  # two groups + one head per group
    (4, [1, 4, 7, 10], [0, 4, 8, 12]),
]


@pytest.mark.parametrize("tp, removed_heads, removed_ffn", REMOVALS)
def test_kept_indices_slice_each_shard_into_the_shard_of_the_pruned_full_tensor(
    tp, removed_heads, removed_ffn
):
    arch = Architecture(HIDDEN, 8, HEAD_DIM, (WIDTHS,))
    plan = Plan(heads={0: removed_heads}, ffn={0: removed_ffn})
    new_widths = plan.validate(arch, tp).layers[0]
    layout = LayerLayout(WIDTHS, HEAD_DIM, tp)

    surviving = [[k for k in group if k not in removed_heads] for group in grouped_heads(WIDTHS)]
    surviving_groups = [(g, heads) for g, heads in enumerate(surviving) if heads]
    assert len(surviving_groups) == new_widths.num_query_groups
    # The pruned full tensors, built from scratch in the new layout (k/v keep their labels).
    new_qkv_labels = []
    for g, heads in surviving_groups:
        new_qkv_labels += [code(Q, k, i) for k in heads for i in range(HEAD_DIM)]
        new_qkv_labels += [code(K, g, i) for i in range(HEAD_DIM)]
        new_qkv_labels += [code(V, g, i) for i in range(HEAD_DIM)]
    new_qkv = torch.tensor(new_qkv_labels)[:, None] * 100 + torch.arange(HIDDEN)
    new_heads = [k for _, heads in surviving_groups for k in heads]
    kept_channels = [c for c in range(WIDTHS.ffn_hidden_size) if c not in removed_ffn]

    old_qkv = row_shards(full_qkv(grouped_heads(WIDTHS)), tp)
    old_proj = list(torch.chunk(full_proj(list(range(12))), tp, dim=1))
    old_fc1 = fc1_shards(list(range(16)), tp)
    old_fc2 = fc2_shards(list(range(16)), tp)
    want_qkv = row_shards(new_qkv, tp)
    want_proj = list(torch.chunk(full_proj(new_heads), tp, dim=1))
    want_fc1, want_fc2 = fc1_shards(kept_channels, tp), fc2_shards(kept_channels, tp)
    for r in range(tp):
        assert torch.equal(old_qkv[r][layout.kept_qkv_rows(r, removed_heads)], want_qkv[r])
        assert torch.equal(old_proj[r][:, layout.kept_proj_columns(r, removed_heads)], want_proj[r])
        assert torch.equal(old_fc1[r][layout.kept_fc1_rows(r, removed_ffn)], want_fc1[r])
        assert torch.equal(old_fc2[r][:, layout.kept_fc2_columns(r, removed_ffn)], want_fc2[r])


def test_removed_groups_are_those_that_lose_every_head():
    layout = LayerLayout(WIDTHS, HEAD_DIM, 1)
    assert layout.removed_groups([3, 4, 5, 0, 7]) == [1]


def test_kept_hidden_is_the_complement_of_the_removed_channels():
    arch = Architecture(HIDDEN, 8, HEAD_DIM, (WIDTHS,))
    assert kept_hidden(arch, [4, 1]).tolist() == [0, 2, 3, 5]


def test_out_of_range_indices_are_rejected():
    layout = LayerLayout(WIDTHS, HEAD_DIM, 2)
    with pytest.raises(ValueError, match="out of range"):
        layout.qkv_query_rows(12)
    with pytest.raises(ValueError, match="out of range"):
        layout.kept_fc2_columns(0, [16])
    with pytest.raises(ValueError, match="out of range"):
        complement(4, [4])


def test_layout_rejects_widths_not_divisible_by_tp():
    with pytest.raises(ValueError, match="not divisible by TP size 3"):
        LayerLayout(WIDTHS, HEAD_DIM, 3)


# -- parameter counts -----------------------------------------------------------------------

ARCHS = [
    Architecture(
        hidden_size=32,
        vocab_size=50,
        head_dim=8,
        layers=(LayerWidths(8, 4, 48), LayerWidths(6, 2, 40), LayerWidths(4, 4, 24)),
    ),
    Architecture.uniform(
        hidden_size=24,
        num_layers=2,
        num_attention_heads=6,
        num_query_groups=3,
        ffn_hidden_size=36,
        vocab_size=40,
        tie_embeddings=True,
    ),
]


def removed_by(arch: Architecture, plan: Plan) -> int:
    return arch.num_parameters() - plan.apply(arch).num_parameters()


@pytest.mark.parametrize("arch", ARCHS)
def test_one_head_from_every_group_removes_that_many_head_sizes(arch):
    sizes = GroupSizes.of(arch)
    for l, w in enumerate(arch.layers):
        if w.heads_per_group < 2:
            continue
        heads = [g * w.heads_per_group for g in range(w.num_query_groups)]
        assert removed_by(arch, Plan(heads={l: heads})) == w.num_query_groups * sizes.head


@pytest.mark.parametrize("arch", ARCHS)
def test_a_whole_kv_group_removes_its_heads_and_its_kv_rows(arch):
    sizes = GroupSizes.of(arch)
    for l, w in enumerate(arch.layers):
        heads = list(range(w.heads_per_group))  # group 0
        expected = w.heads_per_group * sizes.head + sizes.kv_group
        assert removed_by(arch, Plan(heads={l: heads})) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_an_ffn_channel_removes_three_hidden_widths(arch):
    sizes = GroupSizes.of(arch)
    for l in range(arch.num_layers):
        assert removed_by(arch, Plan(ffn={l: [5]})) == sizes.ffn == 3 * arch.hidden_size
        assert removed_by(arch, Plan(ffn={l: [1, 2, 3]})) == 3 * sizes.ffn


@pytest.mark.parametrize("arch", ARCHS)
def test_a_hidden_channel_removes_everything_that_touches_it(arch):
    sizes = GroupSizes.of(arch)
    assert removed_by(arch, Plan(hidden=[7])) == sizes.hidden
    assert removed_by(arch, Plan(hidden=[0, 3, 9])) == 3 * sizes.hidden
    # ... which is all parameters over the hidden size: every tensor has one hidden dimension.
    assert sizes.hidden * arch.hidden_size == arch.num_parameters()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_layer_removes_its_layer_parameters(arch):
    sizes = GroupSizes.of(arch)
    for l in range(arch.num_layers):
        assert removed_by(arch, Plan(layers=[l])) == sizes.layers[l]


def test_untied_embeddings_count_twice_per_hidden_channel():
    tied = ARCHS[1]
    untied = dataclasses.replace(tied, tie_embeddings=False)
    assert GroupSizes.of(untied).hidden - GroupSizes.of(tied).hidden == tied.vocab_size

"""Pruning once to a given architecture: exact widths, the least salient units of each layer,
the same constraints as the gradual selection, clear errors for unreachable targets; and the
uniform architecture proposed for a parameter count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.pruning.layout import LayerLayout
from efficientllm.pruning.selection import Constraints, check_architecture_reachable, select_architecture
from efficientllm.pruning.targets import as_target_spec, propose_uniform, target_from_spec
from tests.test_pruning_selection import constant_scores, random_scores

SOURCE = Architecture.uniform(hidden_size=64, num_layers=3, num_attention_heads=8, num_query_groups=4,
                              ffn_hidden_size=96, vocab_size=128, head_dim=8)


def _target(hidden: int = 48, heads: int = 4, groups: int = 2, ffn: int = 64) -> Architecture:
    return target_from_spec(SOURCE, {"hidden_size": hidden, "num_attention_heads": heads,
                                     "num_query_groups": groups, "ffn_hidden_size": ffn})


@pytest.mark.parametrize("tp, align", [(1, 1), (2, 8), (2, 16)])
def test_prune_once_ends_exactly_at_the_target_widths(tp, align):
    target = _target()
    selection = select_architecture(SOURCE, random_scores(seed=tp), target, Constraints(tensor_parallel_size=tp, align=align))
    assert selection.plan.apply(SOURCE) == target
    assert selection.params_after == target.num_parameters() == selection.target_params
    assert not selection.plan.layers


def test_each_layer_loses_its_own_least_salient_ffn_channels_and_the_model_its_least_salient_hidden():
    scores = constant_scores(SOURCE)
    cheap = {l: torch.randperm(96, generator=torch.Generator().manual_seed(l))[:32] for l in range(3)}
    for l, channels in cheap.items():
        scores["ffn"][l][channels] = 0.1 * (l + 1)  # a different level per layer: no global ranking
    scores["hidden"][torch.arange(0, 64, 4)] = 0.0
    selection = select_architecture(SOURCE, scores, _target(heads=8, groups=4), Constraints(kinds=("ffn", "hidden")))
    assert dict(selection.plan.ffn) == {l: tuple(sorted(c.tolist())) for l, c in cheap.items()}
    assert selection.plan.hidden == tuple(range(0, 64, 4))


def test_heads_go_one_per_group_or_as_whole_groups_by_their_scores():
    scores = constant_scores(SOURCE)
    scores["head"][0][[2, 3]] = 0.0  # layer 0: KV group 1's heads are worthless -> the group goes
    scores["head"][1][[0, 3, 4, 7]] = 0.0  # layer 1: one cheap head in every group
    target = dataclasses.replace(SOURCE, layers=(LayerWidths(6, 3, 96), LayerWidths(4, 4, 96), LayerWidths(8, 4, 96)))
    selection = select_architecture(SOURCE, scores, target, Constraints(kinds=("head",)))
    assert dict(selection.plan.heads) == {0: (2, 3), 1: (0, 3, 4, 7)}


def test_every_tp_rank_keeps_an_equal_share_and_whole_groups_go_one_per_rank():
    arch = Architecture.uniform(hidden_size=64, num_layers=2, num_attention_heads=8, num_query_groups=4,
                                ffn_hidden_size=96, vocab_size=128, head_dim=8)
    scores = random_scores(arch, seed=3)
    scores["ffn"][0][:48] = -1.0  # rank 0's half is cheapest: still only half the removal is its own
    target = dataclasses.replace(arch, layers=(LayerWidths(4, 2, 48),) * 2)
    plan = select_architecture(arch, scores, target, Constraints(tensor_parallel_size=2)).plan
    for l in range(2):
        layout = LayerLayout.of(arch, l, 2)
        assert [sum(layout.rank_of_ffn(c) == r for c in plan.removed_ffn(l)) for r in (0, 1)] == [24, 24]
        gone = layout.removed_groups(plan.removed_heads(l))
        assert sorted(layout.rank_of_group(g) for g in gone) == [0, 1]


def test_per_layer_targets_and_widths_left_out_keep_the_source():
    layers = [{"num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": f} for f in (32, 64, 96)]
    target = target_from_spec(SOURCE, {"layers": layers})
    assert target.hidden_size == 64 and [l.ffn_hidden_size for l in target.layers] == [32, 64, 96]
    plan = select_architecture(SOURCE, random_scores(), target, Constraints()).plan
    assert [len(plan.removed_ffn(l)) for l in range(3)] == [64, 32, 0] and not plan.hidden and not plan.heads
    only_ffn = target_from_spec(SOURCE, {"ffn_hidden_size": 48})
    assert only_ffn.hidden_size == 64 and all(l == LayerWidths(8, 4, 48) for l in only_ffn.layers)
    for arch in (target, only_ffn):  # written back as the config mapping, read again
        assert target_from_spec(SOURCE, as_target_spec(arch)) == arch


@pytest.mark.parametrize("spec, constraints, message", [
    ({"ffn_hidden_size": 60}, Constraints(align=8), r"layer 0 ffn_hidden_size 60 .* multiple of 8 \(align 8"),
    ({"ffn_hidden_size": 128}, Constraints(), r"ffn_hidden_size 128 is not reachable from the source's 96: pruning only removes"),
    ({"hidden_size": 40}, Constraints(kinds=("head", "ffn")), r"hidden_size 40 .* kind 'hidden' is not among"),
    ({"hidden_size": 16}, Constraints(min_hidden=32), r"hidden_size 16 .* the minimum is 32"),
    ({"num_attention_heads": 2, "num_query_groups": 2}, Constraints(tensor_parallel_size=2, min_query_groups=4),
     r"num_query_groups 2 .* the minimum is 4"),
    ({"num_attention_heads": 12, "num_query_groups": 4}, Constraints(), r"heads per KV group 3 .* only removes"),
    ({"num_attention_heads": 6, "num_query_groups": 4}, Constraints(), r"not divisible by num_query_groups"),
    ({"ffn_hidden_size": 64}, Constraints(max_ratio={"ffn": 0.2}), r"max_ratio .* one event"),
])
def test_an_unreachable_target_names_the_width_and_why(spec, constraints, message):
    with pytest.raises(ValueError, match=message):
        check_architecture_reachable(SOURCE, target_from_spec(SOURCE, spec), constraints)


def test_a_target_with_another_layer_count_is_refused():
    with pytest.raises(ValueError, match="layers lists 2 layers, the source has 3"):
        target_from_spec(SOURCE, {"layers": [{"num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": 96}] * 2})


SMOLLM2 = Architecture.uniform(hidden_size=576, num_layers=30, num_attention_heads=9, num_query_groups=3,
                               ffn_hidden_size=1536, vocab_size=49152, head_dim=64, tie_embeddings=True)


@pytest.mark.parametrize("fraction, tp, align", [(0.65, 1, 64), (0.5, 3, 32), (0.8, 1, 8)])
def test_the_proposed_uniform_architecture_has_about_the_asked_size_on_the_selections_grid(fraction, tp, align):
    c = Constraints(tensor_parallel_size=tp, align=align, min_hidden=32, min_ffn_per_layer=8)
    target = round(fraction * SMOLLM2.num_parameters())
    proposed = propose_uniform(SMOLLM2, target, c)
    assert proposed.is_uniform and proposed.head_dim == SMOLLM2.head_dim
    check_architecture_reachable(SMOLLM2, proposed, c)  # prune-once can reach it
    assert abs(proposed.num_parameters() - target) / target < 0.03
    layer = proposed.layers[0]
    scales = [proposed.hidden_size / 576, layer.num_attention_heads / 9, layer.ffn_hidden_size / 1536]
    # shrunk together, as far as the grid allows (9 heads in 3 KV groups: 9, 6, 4, 3, 2 or 1)
    assert all(s <= 1 for s in scales) and max(scales) - min(scales) < 0.25, scales


def test_an_unreachable_target_architecture_stops_the_run_before_any_work(single_rank, tmp_path):
    from efficientllm.config import ConfigError, load_config
    from efficientllm.training.trainer import Trainer

    config = load_config(None, [f"run_dir={tmp_path}", "prune.target_ratio=null", "prune.start_step=150",
                                "prune.end_step=150", "prune.target_architecture={ffn_hidden_size: 1000}"])
    with pytest.raises(ConfigError, match=r"prune.target_architecture: .*layer 0 ffn_hidden_size 1000 .*"
                                          r"source's \d+: pruning only removes"):
        Trainer(config, single_rank)
    assert not (tmp_path / "data").exists(), "no data was prepared"


@pytest.mark.parametrize("overrides, message", [
    (["prune.end_step=200"], r"prunes once: set prune.start_step == prune.end_step \(got 150 and 200\)"),
    (["prune.target_architecture={ffn: 256}"], r"unknown field 'ffn'; valid: hidden_size, num_attention_heads"),
    (["prune.target_architecture={ffn_hidden_size: 256, layers: []}"], r"either layers or the uniform ffn_hidden_size"),
    (["prune.target_architecture={hidden_size: 0}"], r"prune.target_architecture.hidden_size must be a positive integer"),
    (["prune.target_architecture={layers: [{ffn_hidden_size: 8}]}"], r"layers\[0\] needs exactly num_attention_heads"),
    (["prune.target_ratio=0.5"], r"exactly one of prune.target_params, prune.target_ratio and prune.target_architecture"),
])
def test_a_malformed_target_architecture_is_one_line_at_config_load(overrides, message):
    from efficientllm.config import ConfigError, load_config

    base = ["prune.target_ratio=null", "prune.start_step=150", "prune.end_step=150",
            "prune.target_architecture={ffn_hidden_size: 256}"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + overrides)

"""Global selection: cheapest units first, budget met, constraints kept, deterministic."""

import math

import pytest
import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.pruning.layout import GroupSizes, LayerLayout
from efficientllm.pruning.selection import Constraints, check_reachable, select, smallest_reachable

ARCH = Architecture.uniform(
    hidden_size=64,
    num_layers=3,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=96,
    vocab_size=128,
    head_dim=8,
)
SIZES = GroupSizes.of(ARCH)
ONLY_FFN = Constraints(kinds=("ffn",))


def random_scores(
    arch: Architecture = ARCH, seed: int = 0, kinds=("head", "ffn", "hidden", "layer")
):
    g = torch.Generator().manual_seed(seed)
    scores = {
        "head": [torch.rand(l.num_attention_heads, generator=g) for l in arch.layers],
        "kv_group": [torch.rand(l.num_query_groups, generator=g) for l in arch.layers],
        "ffn": [torch.rand(l.ffn_hidden_size, generator=g) for l in arch.layers],
        "hidden": torch.rand(arch.hidden_size, generator=g),
        "layer": torch.rand(arch.num_layers, generator=g),
    }
    return {k: v for k, v in scores.items() if k in kinds or (k == "kv_group" and "head" in kinds)}


def constant_scores(arch: Architecture = ARCH, value: float = 1.0):
    return {
        "head": [torch.full((l.num_attention_heads,), value) for l in arch.layers],
        "kv_group": [torch.full((l.num_query_groups,), value) for l in arch.layers],
        "ffn": [torch.full((l.ffn_hidden_size,), value) for l in arch.layers],
        "hidden": torch.full((arch.hidden_size,), value),
        "layer": torch.full((arch.num_layers,), value),
    }


def test_takes_the_lowest_scoring_channels_first():
    scores = constant_scores()
    scores["ffn"][1][[17, 40]] = 0.1
    scores["ffn"][2][3] = 0.2
    result = select(ARCH, scores, 3 * SIZES.ffn, ONLY_FFN)
    assert dict(result.plan.ffn) == {1: (17, 40), 2: (3,)}
    assert result.met and result.overshoot == 0


def test_ranks_all_kinds_and_layers_in_one_list():
    scores = constant_scores()
    scores["head"][2][[1, 2, 5, 7]] = 0.0  # the cheapest head of every group of layer 2
    scores["hidden"][[9]] = 0.0
    result = select(ARCH, scores, 1, Constraints(align=1))
    assert [u.kind for u in result.units] == ["head"]
    assert dict(result.plan.heads) == {2: (1, 2, 5, 7)}


def test_saliency_per_parameter_prefers_the_larger_group_at_equal_score():
    # A hidden channel touches far more parameters than an FFN channel: at equal saliency it
    # is the cheaper removal per parameter.
    result = select(ARCH, constant_scores(), 1, Constraints(kinds=("ffn", "hidden")))
    assert result.units[0].kind == "hidden"


def test_per_group_normalisation_ranks_by_raw_score():
    scores = constant_scores()
    scores["ffn"][0][5] = 0.5
    constraints = Constraints(kinds=("ffn", "hidden"))
    assert select(ARCH, scores, 1, constraints, "per_parameter").units[0].kind == "hidden"
    per_group = select(ARCH, scores, 1, constraints, "per_group")
    assert per_group.units[0].kind == "ffn" and per_group.units[0].indices == (5,)


def test_kind_weights_shift_the_ranking_away_from_a_kind():
    unweighted = select(ARCH, constant_scores(), 1, Constraints(kinds=("ffn", "hidden")))
    assert unweighted.units[0].kind == "hidden"
    weighted = select(
        ARCH, constant_scores(), 1, Constraints(kinds=("ffn", "hidden")), {"hidden": 1e6}
    )
    assert weighted.units[0].kind == "ffn"


@pytest.mark.parametrize("budget", [1, 5_000, 20_000, 60_000, 90_000])
@pytest.mark.parametrize("tp, align", [(1, 1), (2, 8), (4, 16)])
def test_meets_the_budget_and_stops_within_one_unit(budget, tp, align):
    constraints = Constraints(
        tensor_parallel_size=tp, align=align, kinds=("head", "ffn", "hidden", "layer")
    )
    result = select(ARCH, random_scores(seed=budget), budget, constraints)
    assert result.met
    assert result.params_after == result.plan.apply(ARCH).num_parameters()
    assert result.params_after <= ARCH.num_parameters() - budget
    # Without its last unit the budget was not met yet.
    assert result.params_after + result.units[-1].removed > result.target_params
    assert sum(u.removed for u in result.units) == result.params_before - result.params_after


@pytest.mark.parametrize("tp", [2, 4])
def test_every_tp_rank_loses_an_equal_share_of_groups_and_channels(tp):
    for seed in range(5):
        result = select(
            ARCH, random_scores(seed=seed), 120_000, Constraints(tensor_parallel_size=tp)
        )
        plan = result.plan
        new = plan.validate(ARCH, tp)  # raises on an unbalanced layer
        new.validate(tp)
        for l in range(ARCH.num_layers):
            layout = LayerLayout.of(ARCH, l, tp)
            per_rank = [
                sum(layout.rank_of_ffn(c) == r for c in plan.removed_ffn(l)) for r in range(tp)
            ]
            assert len(set(per_rank)) == 1


def test_ffn_takes_the_cheapest_channels_of_each_rank_not_of_the_layer():
    scores = constant_scores()
    scores["ffn"][0][:48] = 0.0  # all of rank 0 cheap, rank 1 not
    result = select(ARCH, scores, 1, Constraints(tensor_parallel_size=2, align=4, kinds=("ffn",)))
    assert result.plan.removed_ffn(0) == (0, 1, 48, 49)  # lcm(4, 2) = 4: two per rank


def test_widths_stay_multiples_of_alignment_and_tp_and_hidden_ends_its_phase_aligned():
    constraints = Constraints(tensor_parallel_size=2, align=12, min_hidden=8, min_ffn_per_layer=8)
    for budget in (10_000, 80_000, 200_000):
        scores = random_scores(seed=budget)
        new = select(ARCH, scores, budget, constraints).plan.apply(ARCH)
        assert all(l.ffn_hidden_size % 12 == 0 for l in new.layers)  # lcm(12, 2)
        # a one-event phase: a hidden unit is only started if it completes in it
        last = ARCH.num_parameters() - budget
        new = select(ARCH, scores, budget, constraints, phase_target=last).plan.apply(ARCH)
        assert new.hidden_size % 12 == 0 and all(l.ffn_hidden_size % 12 == 0 for l in new.layers)


def test_a_misaligned_width_is_aligned_by_the_first_unit():
    arch = Architecture.uniform(
        hidden_size=70,
        num_layers=1,
        num_attention_heads=2,
        num_query_groups=2,
        ffn_hidden_size=100,
        vocab_size=32,
        head_dim=8,
    )
    constraints = Constraints(tensor_parallel_size=2, align=16, kinds=("ffn", "hidden"))
    result = select(arch, random_scores(arch), 1, constraints)
    # an unaligned hidden width is brought to alignment first, one channel at a time
    assert [(u.kind, len(u.indices)) for u in result.units] == [("hidden", 1)]
    result = select(arch, random_scores(arch), 70 % 16 * GroupSizes.of(arch).hidden, constraints)
    assert [u.kind for u in result.units] == ["hidden"] * (70 % 16)
    assert result.plan.apply(arch).hidden_size == 64
    result = select(arch, random_scores(arch), 1, Constraints(tensor_parallel_size=2, align=16, kinds=("ffn",)))
    assert [len(u.indices) for u in result.units] == [100 % 16]  # the ffn remainder is one unit
    assert result.plan.apply(arch).layers[0].ffn_hidden_size % 16 == 0


def test_every_kv_group_keeps_the_same_number_of_heads():
    for seed in range(10):
        result = select(
            ARCH, random_scores(seed=seed), 100_000, Constraints(tensor_parallel_size=2)
        )
        result.plan.apply(ARCH)  # raises if GQA were broken


def test_one_head_per_group_takes_each_groups_own_cheapest_head():
    scores = constant_scores()
    scores["head"][0][[1, 2, 5, 6]] = 0.1  # a different position j in every group
    result = select(ARCH, scores, 1, Constraints(kinds=("head",)))
    assert result.units[0].kind == "head"
    assert result.plan.removed_heads(0) == (1, 2, 5, 6)
    assert result.plan.apply(ARCH).layers[0] == LayerWidths(4, 4, 96)


def test_at_uniform_saliency_per_parameter_one_head_per_group_goes_before_a_whole_group():
    result = select(ARCH, constant_scores(), 1, Constraints(kinds=("head",)))
    assert result.units[0].kind == "head"


def test_a_group_of_cheap_heads_goes_as_a_whole_kv_group():
    scores = constant_scores()
    scores["head"][1][[4, 5]] = 0.0  # both heads of group 2
    result = select(ARCH, scores, 1, Constraints(kinds=("head",)))
    assert result.units[0].kind == "kv_group"
    assert result.plan.apply(ARCH).layers[1] == LayerWidths(6, 3, 96)


def test_kv_scores_count_against_removing_a_whole_group():
    scores = constant_scores()
    scores["head"][1][[4, 5]] = 0.0
    scores["kv_group"][1][2] = 100.0  # its k/v rows matter
    result = select(ARCH, scores, 1, Constraints(kinds=("head",)))
    assert result.units[0].kind == "head"


def test_whole_groups_go_one_per_tp_rank():
    scores = constant_scores()
    scores["head"][1][[0, 1, 2, 3]] = 0.0  # groups 0 and 1: both on rank 0 at TP 2
    scores["kv_group"][1][[0, 1]] = 0.0
    scores["head"][1][[4, 5]] = 0.2  # group 2: the cheapest on rank 1
    scores["kv_group"][1][2] = 0.2
    result = select(ARCH, scores, 1, Constraints(tensor_parallel_size=2, kinds=("head",)))
    unit = result.units[0]
    assert unit.kind == "kv_group"
    assert LayerLayout.of(ARCH, 1, 2).removed_groups(unit.indices) == [0, 2]  # ties: lowest index


def test_minimum_widths_are_kept_when_the_budget_exceeds_them():
    constraints = Constraints(min_heads_per_layer=4, min_ffn_per_layer=24, min_hidden=40, align=8)
    result = select(ARCH, random_scores(), ARCH.num_parameters(), constraints)
    new = result.plan.apply(ARCH)
    assert not result.met and result.shortfall == result.params_after - result.target_params > 0
    assert new.hidden_size == 40
    for l in new.layers:
        assert l.num_attention_heads >= 4 and l.ffn_hidden_size == 24
    assert result.params_after <= smallest_reachable(ARCH, constraints)


def test_taking_everything_allowed_reaches_the_smallest_reachable_model():
    constraints = Constraints(
        tensor_parallel_size=2, align=8, kinds=("head", "ffn", "hidden", "layer"), min_layers=2
    )
    result = select(ARCH, random_scores(), ARCH.num_parameters(), constraints)
    new = result.plan.apply(ARCH)
    assert new.num_layers == 2 and new.hidden_size == 8
    assert all(l == LayerWidths(2, 2, 8) for l in new.layers)
    assert result.params_after == smallest_reachable(ARCH, constraints)


def test_max_ratio_caps_what_one_event_removes():
    constraints = Constraints(max_ratio={"ffn": 0.25}, kinds=("ffn",))
    result = select(ARCH, random_scores(), ARCH.num_parameters(), constraints)
    assert all(len(result.plan.removed_ffn(l)) == 24 for l in range(3))


def test_layer_units_remove_whole_blocks_and_drop_their_other_removals():
    scores = constant_scores()
    scores["layer"][1] = 0.0
    scores["ffn"][1][:] = 0.0  # cheaper still: taken first, then made moot by the layer
    budget = SIZES.layers[1]
    result = select(ARCH, scores, budget, Constraints(kinds=("ffn", "layer")))
    assert result.plan.layers == (1,)
    assert result.plan.removed_ffn(1) == ()
    assert result.met


def test_zero_budget_selects_nothing():
    result = select(ARCH, random_scores(), 0)
    assert result.plan.is_empty and result.met and result.units == ()


def test_repeated_runs_give_bit_identical_plans():
    scores = random_scores(seed=3)
    runs = [
        select(ARCH, scores, 90_000, Constraints(tensor_parallel_size=2, align=8)) for _ in range(3)
    ]
    assert len({r.plan.checksum() for r in runs}) == 1
    assert runs[0].units == runs[1].units == runs[2].units


def test_the_order_scores_are_given_in_does_not_matter():
    scores = random_scores(seed=4)
    as_lists = select(ARCH, scores, 90_000)
    reordered = {
        "hidden": scores["hidden"].clone(),
        "ffn": {l: scores["ffn"][l] for l in reversed(range(3))},
        "head": {l: scores["head"][l].tolist() for l in (2, 0, 1)},
        "kv_group": {l: scores["kv_group"][l] for l in (1, 2, 0)},
    }
    assert select(ARCH, reordered, 90_000).plan == as_lists.plan


def test_equal_scores_break_ties_by_kind_then_layer_then_index():
    result = select(ARCH, constant_scores(), 1, Constraints(), "per_group")
    unit = result.units[0]
    assert (unit.kind, unit.layer, unit.indices) == ("head", 0, (0, 2, 4, 6))
    ffn = select(ARCH, constant_scores(), 1, Constraints(kinds=("ffn",), align=2)).units[0]
    assert (ffn.layer, ffn.indices) == (0, (0, 1))


def test_unreachable_target_raises_a_clear_error():
    constraints = Constraints(min_heads_per_layer=4, min_ffn_per_layer=32, min_hidden=32, align=8)
    floor = smallest_reachable(ARCH, constraints)
    check_reachable(ARCH, floor, constraints)
    with pytest.raises(
        ValueError, match=rf"target_params {floor - 1} unreachable.*has {floor} parameters"
    ):
        check_reachable(ARCH, floor - 1, constraints)


def test_a_reachable_target_is_met_whatever_the_scores():
    constraints = Constraints(
        min_heads_per_layer=4, min_ffn_per_layer=32, min_hidden=32, align=8, tensor_parallel_size=2
    )
    floor = smallest_reachable(ARCH, constraints)
    for seed in range(5):
        assert select(
            ARCH, random_scores(seed=seed), ARCH.num_parameters() - floor, constraints
        ).met


def test_heterogeneous_layers_are_ranked_together():
    arch = Architecture(
        64, 128, 8, (LayerWidths(8, 4, 96), LayerWidths(4, 2, 32), LayerWidths(6, 2, 64))
    )
    result = select(arch, random_scores(arch), 40_000, Constraints(tensor_parallel_size=2, align=8))
    assert result.met
    result.plan.validate(arch, 2)


def test_bad_scores_are_rejected():
    scores = random_scores()
    scores["ffn"][0] = torch.rand(95)
    with pytest.raises(ValueError, match=r"scores\['ffn'\]\[0\]: expected shape \(96,\)"):
        select(ARCH, scores, 1)
    scores = random_scores()
    scores["hidden"][3] = math.nan
    with pytest.raises(ValueError, match="finite"):
        select(ARCH, scores, 1)
    with pytest.raises(ValueError, match="no entry"):
        select(ARCH, random_scores(kinds=("ffn",)), 1)


def test_architecture_not_divisible_by_tp_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        select(ARCH, random_scores(), 1, Constraints(tensor_parallel_size=3))

"""The Plan: what an event removes, its effect on the Architecture, its canonical record."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.pruning.plan import Plan, pruning_ratios

ARCH = Architecture(
    hidden_size=32,
    vocab_size=64,
    head_dim=8,
    layers=(LayerWidths(8, 4, 48), LayerWidths(8, 4, 48), LayerWidths(6, 2, 32)),
)


def test_removing_one_head_from_every_group_lowers_heads_and_keeps_groups():
    new = Plan(heads={0: [0, 3, 5, 6]}).apply(ARCH)
    assert new.layers[0] == LayerWidths(4, 4, 48)
    assert new.layers[1:] == ARCH.layers[1:]


def test_removing_every_head_of_a_group_lowers_query_groups():
    new = Plan(heads={2: [3, 4, 5]}).apply(ARCH)
    assert new.layers[2] == LayerWidths(3, 1, 32)


def test_removing_groups_and_one_head_per_remaining_group_combines():
    new = Plan(heads={0: [2, 3, 4, 5, 0, 7]}).apply(ARCH)  # groups 1, 2 whole; 0 and 3 lose one
    assert new.layers[0] == LayerWidths(2, 2, 48)


def test_unequal_heads_per_group_are_rejected():
    with pytest.raises(ValueError, match="unequal numbers of query heads"):
        Plan(heads={0: [0]}).apply(ARCH)


def test_ffn_hidden_and_layer_removals_shrink_their_widths():
    new = Plan(ffn={1: [0, 1, 2]}, hidden=[5, 6], layers=[0]).apply(ARCH)
    assert new.hidden_size == 30
    assert new.layers == (LayerWidths(8, 4, 45), LayerWidths(6, 2, 32))


def test_removing_a_whole_width_is_rejected():
    with pytest.raises(ValueError, match="all 48 ffn channels"):
        Plan(ffn={0: range(48)}).apply(ARCH)
    with pytest.raises(ValueError, match="all 3 layers"):
        Plan(layers=[0, 1, 2]).apply(ARCH)
    with pytest.raises(ValueError, match="out of range"):
        Plan(hidden=[32]).apply(ARCH)


def test_validate_rejects_groups_removed_unevenly_over_tp_ranks():
    plan = Plan(heads={0: [0, 1, 2, 3]})  # groups 0 and 1: both on rank 0 at TP 2
    plan.validate(ARCH, 1)
    with pytest.raises(ValueError, match="unbalanced"):
        plan.validate(ARCH, 2)


def test_validate_rejects_ffn_channels_removed_unevenly_over_tp_ranks():
    with pytest.raises(ValueError, match="unbalanced"):
        Plan(ffn={0: [0, 1]}).validate(ARCH, 2)
    Plan(ffn={0: [0, 24]}).validate(ARCH, 2)


def test_equal_plans_are_canonical_whatever_the_input_order():
    a = Plan(heads={1: [3, 1, 1], 0: [2]}, ffn={2: torch.tensor([7, 4])}, hidden=[9, 2, 9])
    b = Plan(heads=[(0, [2]), (1, [1, 3]), (2, [])], ffn=[(2, (4, 7))], hidden=(2, 9))
    assert a == b
    assert a.to_json() == b.to_json()
    assert a.checksum() == b.checksum()


def test_different_plans_have_different_checksums():
    assert Plan(hidden=[1]).checksum() != Plan(hidden=[2]).checksum()
    assert Plan(ffn={0: [1]}).checksum() != Plan(ffn={1: [1]}).checksum()


def test_json_round_trip_gives_the_same_plan():
    plan = Plan(heads={0: [0, 3, 5, 6]}, ffn={1: [4]}, hidden=[3], layers=[2])
    assert Plan.from_json(plan.to_json()) == plan


def test_checksum_is_the_same_in_another_process():
    plan = Plan(heads={0: [0, 3, 5, 6]}, ffn={1: [4, 40]}, hidden=[3])
    code = (
        "from efficientllm.pruning.plan import Plan;"
        "print(Plan(heads={0: [6, 5, 3, 0]}, ffn={1: [40, 4]}, hidden=[3]).checksum())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another str hash() than this process
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert int(out.stdout) == plan.checksum()
    assert 0 <= plan.checksum() < 2**63  # fits a signed int64 tensor for the all-reduce


def test_counts_and_emptiness_for_logs():
    assert Plan().is_empty
    plan = Plan(heads={0: [0, 3, 5, 6], 2: [0, 1, 2]}, ffn={1: [4]}, hidden=[3, 4])
    assert not plan.is_empty
    assert plan.counts() == {"head": 7, "ffn": 1, "hidden": 2, "layer": 0}
    assert "7 heads (1 KV groups)" in plan.describe(ARCH)


def test_union_merges_removals_of_the_same_architecture():
    merged = Plan(ffn={0: [1]}, hidden=[2]).union(Plan(ffn={0: [3], 1: [0]}, hidden=[2]))
    assert merged == Plan(ffn={0: [1, 3], 1: [0]}, hidden=[2])


def test_malformed_records_are_rejected():
    with pytest.raises(ValueError, match="malformed plan record"):
        Plan.from_dict({"heads": [], "mystery": []})
    with pytest.raises(ValueError, match="must be >= 0"):
        Plan(hidden=[-1])


def test_pruning_ratios_report_each_kind():
    new = Plan(ffn={0: range(24)}, hidden=range(8)).apply(ARCH)
    ratios = pruning_ratios(ARCH, new)
    assert ratios["ffn"] == pytest.approx(24 / 128)
    assert ratios["hidden"] == pytest.approx(0.25)
    assert ratios["head"] == 0.0 and ratios["layer"] == 0.0
    assert ratios["params"] == pytest.approx(1 - new.num_parameters() / ARCH.num_parameters())

"""Gradual budgets: with the plain selection code alone (no model), the parameter count follows
the schedule within one unit at every event and ends within one unit of the target, on the
shipped 1.7B example's Architecture and on the default job's, also when the ranking prefers
hidden channels, whose aligned unit of the 1.7B model is hundreds of events' budgets."""

from __future__ import annotations

import math

import pytest
import torch

from efficientllm.architecture import Architecture, architecture_from_config
from efficientllm.config import CONFIG_DIR, DEFAULT_CONFIG, load_config
from efficientllm.pruning.layout import GroupSizes
from efficientllm.pruning.schedule import PruningSchedule
from efficientllm.pruning.selection import Constraints, select

EXAMPLE_1_7B = CONFIG_DIR / "examples/smollm-1.7b-to-469m-8x8.yaml"


def _job(path, vocab_size: int) -> tuple[Architecture, PruningSchedule, Constraints]:
    config = load_config(path, ["model.transformer_impl=local"])  # the shapes; the spec is irrelevant
    arch = architecture_from_config(config, vocab_size)
    pr, tp = config.prune, config.parallel.tensor_model_parallel_size
    source = arch.num_parameters()
    target = pr.target_params if pr.target_params is not None else round(pr.target_ratio * source)
    constraints = Constraints(tensor_parallel_size=tp, align=pr.align, min_heads_per_layer=pr.min_heads_per_layer,
                              min_query_groups=pr.min_query_groups, min_ffn_per_layer=pr.min_ffn_per_layer,
                              min_hidden=pr.min_hidden, kinds=tuple(pr.kinds))
    return arch, PruningSchedule(source, target, pr.start_step, pr.end_step, pr.interval), constraints


def _scores(arch: Architecture, step: int, hidden_weight: float) -> dict:
    g = torch.Generator().manual_seed(step)
    rand = lambda n: torch.rand(n, generator=g, dtype=torch.float64)
    return {"head": [rand(l.num_attention_heads) for l in arch.layers],
            "kv_group": [rand(l.num_query_groups) for l in arch.layers],
            "ffn": [rand(l.ffn_hidden_size) for l in arch.layers],
            "hidden": rand(arch.hidden_size) * hidden_weight}


def _one_unit(arch: Architecture, c: Constraints) -> int:
    """The largest single removal allowed: a head/ffn unit of the widest layer, or one hidden
    channel (independent of the selection's own bookkeeping)."""
    sizes, tp = GroupSizes.of(arch), c.tensor_parallel_size
    heads = max(max(l.num_query_groups * sizes.head, tp * (l.heads_per_group * sizes.head + sizes.kv_group))
                for l in arch.layers)
    return max(heads, math.lcm(c.align, tp) * sizes.ffn, sizes.hidden)


def _follow(arch, schedule, constraints, steps, hidden_weight, bound) -> Architecture:
    """Run the events of `steps` and check the count against the schedule after each."""
    for step in steps:
        if not schedule.is_event(step):
            continue
        budget = schedule.budget(step)
        if arch.num_parameters() > budget:
            selection = select(arch, _scores(arch, step, hidden_weight), arch.num_parameters() - budget,
                               constraints, phase_target=schedule.target_params)
            assert selection.unit_bound <= bound
            arch = selection.plan.apply(arch)
        assert budget - bound < arch.num_parameters() <= budget, (step, arch.num_parameters(), budget)
    return arch


@pytest.mark.parametrize("hidden_weight", [1.0, 1e-6], ids=["random", "hidden-cheapest"])
def test_the_1_7b_example_follows_its_schedule_within_one_unit(hidden_weight):
    arch, schedule, constraints = _job(EXAMPLE_1_7B, 49152)
    bound = _one_unit(arch, constraints)
    sizes = GroupSizes.of(arch)
    per_event = (schedule.source_params - schedule.target_params) / (schedule.end_step - schedule.start_step + 1)
    assert constraints.align * sizes.hidden > 300 * per_event > bound  # one aligned hidden unit: 354 events
    # The first events (a whole aligned hidden unit goes when hidden is cheapest) ...
    early = _follow(arch, schedule, constraints, range(0, 420), hidden_weight, bound)
    if hidden_weight < 1:
        assert early.hidden_size <= arch.hidden_size - constraints.align, "hidden was pruned, gradually"
    # ... and the last ones, from the state one selection reaches at step 8050.
    late = schedule.budget(8050)
    jump = select(arch, _scores(arch, 8050, hidden_weight), arch.num_parameters() - late, constraints,
                  phase_target=schedule.target_params).plan.apply(arch)
    final = _follow(jump, schedule, constraints, range(8051, schedule.end_step + 1), hidden_weight, bound)
    assert schedule.target_params - bound < final.num_parameters() <= schedule.target_params
    assert final.hidden_size % constraints.align == 0, "the phase ends aligned"
    assert all(l.ffn_hidden_size % math.lcm(constraints.align, 2) == 0 for l in final.layers)


@pytest.mark.parametrize("hidden_weight", [1.0, 1e-6], ids=["random", "hidden-cheapest"])
def test_the_default_job_follows_its_schedule_within_one_unit_to_its_target(hidden_weight):
    arch, schedule, constraints = _job(DEFAULT_CONFIG, 4096)
    bound = _one_unit(arch, constraints)
    final = _follow(arch, schedule, constraints, range(schedule.start_step, schedule.end_step + 1),
                    hidden_weight, bound)
    assert schedule.target_params - bound < final.num_parameters() <= schedule.target_params
    assert final.hidden_size % constraints.align == 0
    if hidden_weight < 1:
        assert final.hidden_size < arch.hidden_size

"""The pruning budget falls linearly from the source to the target size between its steps."""

import pytest

from efficientllm.pruning.schedule import PruningSchedule


def test_budget_is_linear_and_ends_at_the_target():
    s = PruningSchedule(source_params=1000, target_params=400, start_step=10, end_step=19)
    budgets = [s.budget(step) for step in range(10, 20)]
    assert budgets == [940, 880, 820, 760, 700, 640, 580, 520, 460, 400]
    assert s.budget(5) == 1000 and s.budget(50) == 400


def test_events_every_interval_and_always_at_the_end():
    s = PruningSchedule(1000, 400, start_step=2, end_step=9, interval=3)
    assert [step for step in range(0, 12) if s.is_event(step)] == [2, 5, 8, 9]


@pytest.mark.parametrize("target", [1000, 1500, 0])
def test_target_must_be_below_the_source(target):
    with pytest.raises(ValueError, match="must be below the source"):
        PruningSchedule(1000, target, 0, 10)

"""When pruning events happen and how many parameters the model may have after each.

The budget falls linearly in parameter count from the source size at `start_step` to the target
size at `end_step`, with an event every `interval` steps (1 = every step, as in the paper);
after `end_step` the compact model is simply pretrained on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PruningSchedule:
    source_params: int
    target_params: int
    start_step: int
    end_step: int
    interval: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.target_params < self.source_params:
            raise ValueError(
                f"prune target {self.target_params:,} parameters must be below the source "
                f"model's {self.source_params:,} and positive"
            )
        if not 0 <= self.start_step <= self.end_step:
            raise ValueError(f"prune.start_step {self.start_step} must be in [0, end_step={self.end_step}]")
        if self.interval < 1:
            raise ValueError(f"prune.interval must be >= 1, got {self.interval}")

    def is_event(self, step: int) -> bool:
        """Events at start_step, every `interval` steps after it, and always at end_step."""
        if not self.start_step <= step <= self.end_step:
            return False
        return (step - self.start_step) % self.interval == 0 or step == self.end_step

    def budget(self, step: int) -> int:
        """The largest parameter count allowed after an event at `step`: the event at
        start_step already removes its share, the one at end_step reaches the target."""
        events_span = self.end_step - self.start_step + 1
        fraction = min(max(step - self.start_step + 1, 0), events_span) / events_span
        return round(self.source_params - fraction * (self.source_params - self.target_params))

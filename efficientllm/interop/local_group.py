"""megatron-core's process groups at TP=1 PP=1 in this one process, for import and export work
that loads a whole model at once (a checkpoint saved at any TP/PP reshards to it on load)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from efficientllm import distributed


@contextlib.contextmanager
def single_process_group(seed: int = 1234) -> Iterator[None]:
    """Form a one-rank group for the duration, or reuse the one this process already has."""
    launch = distributed.LaunchEnv(0, 1, 0, "127.0.0.1", distributed.free_port(), "single")
    with distributed.process_groups(launch, 1, 1, seed=seed):
        yield

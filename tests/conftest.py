"""Shared fixtures: one single-rank gloo process group per test session (megatron keeps global
state, so in-process tests share it; multi-rank tests start their own processes)."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", module="megatron")


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed + megatron parallel_state at TP=PP=DP=1 in this process."""
    from efficientllm import distributed
    from efficientllm.distributed import free_port

    launch = distributed.LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    distributed.initialize(launch, 1, 1, None, seed=1234)
    yield launch
    distributed.shutdown()

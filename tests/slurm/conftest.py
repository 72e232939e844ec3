"""A real single-host SLURM for the session, and the tiny corpus/config of the multi-rank tests."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import tiny_config, tiny_corpus  # noqa: F401  (fixtures)
from tests.slurm.cluster import LocalSlurm, SlurmUnavailable, start_local_slurm


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> LocalSlurm:
    """munged + slurmctld + slurmd on localhost, private to this session; stopped by PID at the
    end, also when a test fails. Skips only when SLURM can be neither found nor installed."""
    try:
        cluster = start_local_slurm()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(slurm):
    """The session's SLURM, with an empty queue before and after each test."""
    slurm.cancel_all()
    yield slurm
    slurm.cancel_all()

"""Pruning-aware pretraining under megatron's DistributedOptimizer: a DP2 run with the
distributed optimizer makes the same Plans, ends with the same Architecture and has the same
losses as the TP1PP1 DP1 run with the plain optimizer; at every event the surviving main params
and Adam moments of every rank's owned shards are those of the old state (each rank computing
its own ranges from pieces of the old ones), also under bf16 with fp32 masters."""

from __future__ import annotations

import json
import math

import pytest

from tests.distributed.conftest import train_on_ranks
from tests.distributed.launch import REPO, run_ranks

PRUNE = {"enabled": True, "target_ratio": 0.6, "start_step": 2, "end_step": 4, "interval": 1,
         "min_hidden": 16, "align": 2, "max_ratio": {"ffn": 0.1}}  # heads and hidden go too


def _run_distributed_optimizer(config, out, *overrides: str) -> tuple[list[dict], list[list[dict]]]:
    out.mkdir()
    run_ranks(2, [str(REPO / "tests/distributed/workers/prune_distopt.py"), str(out), str(config),
                  "parallel.use_distributed_optimizer=true", *overrides], out / "logs", timeout=240)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    checks = [json.loads((out / f"surgery{r}.json").read_text()) for r in range(2)]
    assert [r["dp_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["digests"] == ranks[1]["digests"], "DP replicas hold the same weights"
    return ranks, checks


@pytest.mark.parametrize("after_obs", [False, True], ids=["saliency", "score-after-compensation"])
def test_distributed_optimizer_dp2_prunes_like_the_plain_optimizer(tiny_config, tmp_path, after_obs):
    """Also when the ranking reads what OBS leaves: each Hessian is summed onto one owner, whose
    factors every rank gets, and which the event's OBS updates then reuse."""
    config = tiny_config(training={"train_iters": 6}, prune={**PRUNE, "score_after_compensation": after_obs})
    base = train_on_ranks(1, config, tmp_path / "plain")[0]
    ranks, checks = _run_distributed_optimizer(config, tmp_path / "distopt")

    assert len(base["plans"]) == PRUNE["end_step"] - PRUNE["start_step"] + 1, "an event every step"
    assert [r["plans"] for r in ranks] == [base["plans"]] * 2, "the same Plans on every rank"
    assert all(r["architecture"] == base["architecture"] for r in ranks)
    assert len(ranks[0]["losses"]) == len(base["losses"]) == 6
    for a, b in zip(ranks[0]["losses"], base["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (ranks[0]["losses"], base["losses"])

    # Optimizer surgery: every new owned shard got state, bit-identical to the old slice.
    for rank_checks in checks:
        assert len(rank_checks) == len(base["plans"])
        for event in rank_checks:
            assert event["owned"] > 0
            assert event["identical"] == event["owned"] == event["moved"], event
            assert event["rounded"] == event["params"], event
            assert event["shared_steps"] == 0, event


def test_distributed_optimizer_dp2_bf16_computes_each_ranks_masters_from_the_old_masters(tiny_config, tmp_path):
    """Each rank's new fp32 main params come from the old fp32 masters it owns or receives
    (compensated / rescaled row by row), equal to surgery on the whole old master; the model
    holds their bf16 rounding on both replicas; training goes on."""
    config = tiny_config(training={"train_iters": 5, "bf16": True}, prune=PRUNE)
    ranks, checks = _run_distributed_optimizer(config, tmp_path / "bf16")
    assert len(ranks[0]["plans"]) == PRUNE["end_step"] - PRUNE["start_step"] + 1
    assert all(math.isfinite(loss) for loss in ranks[0]["losses"]) and len(ranks[0]["losses"]) == 5
    for rank_checks in checks:
        for event in rank_checks:
            assert event["owned"] > 0
            assert event["identical"] + event["close"] == event["owned"] == event["moved"], event
            assert event["rounded"] == event["params"], event
            assert event["shared_steps"] == 0, event
    assert sum(e["partial_compensated"] for c in checks for e in c) > 0, "a compensated parameter split over ranks"

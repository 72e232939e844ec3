"""Pruning-aware pretraining under megatron's DistributedOptimizer: a DP2 run with the
distributed optimizer makes the same Plans, ends with the same Architecture and has the same
losses as the TP1PP1 DP1 run with the plain optimizer; at every event the surviving main params
and Adam moments of every rank's owned shards are bit-identical to the old ones."""

from __future__ import annotations

import json

from tests.distributed.conftest import train_on_ranks
from tests.distributed.launch import REPO, run_ranks

PRUNE = {"enabled": True, "target_ratio": 0.6, "start_step": 2, "end_step": 4, "interval": 1,
         "min_hidden": 16, "align": 2, "max_ratio": {"ffn": 0.1}}  # heads and hidden go too


def test_distributed_optimizer_dp2_prunes_like_the_plain_optimizer(tiny_config, tmp_path):
    config = tiny_config(training={"train_iters": 6}, prune=PRUNE)
    base = train_on_ranks(1, config, tmp_path / "plain")[0]
    out = tmp_path / "distopt"
    out.mkdir()
    run_ranks(2, [str(REPO / "tests/distributed/workers/prune_distopt.py"), str(out), str(config),
                  "parallel.use_distributed_optimizer=true"], out / "logs", timeout=240)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    checks = [json.loads((out / f"surgery{r}.json").read_text()) for r in range(2)]

    assert len(base["plans"]) == PRUNE["end_step"] - PRUNE["start_step"] + 1, "an event every step"
    assert [r["dp_rank"] for r in ranks] == [0, 1]
    assert [r["plans"] for r in ranks] == [base["plans"]] * 2, "the same Plans on every rank"
    assert all(r["architecture"] == base["architecture"] for r in ranks)
    assert ranks[0]["digests"] == ranks[1]["digests"], "DP replicas hold the same weights"
    assert len(ranks[0]["losses"]) == len(base["losses"]) == 6
    for a, b in zip(ranks[0]["losses"], base["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (ranks[0]["losses"], base["losses"])

    # Optimizer surgery: every new owned shard got state, bit-identical to the old slice.
    for rank_checks in checks:
        assert len(rank_checks) == len(base["plans"])
        for event in rank_checks:
            assert event["owned"] > 0
            assert event["identical"] == event["owned"] == event["moved"], event
            assert event["shared_steps"] == 0, event

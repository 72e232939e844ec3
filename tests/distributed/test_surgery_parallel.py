"""Surgery at TP2 PP2 (with virtual stages) equals surgery at TP1 PP1, and the masked model.

One 4-rank launch (TP2 PP2 VP2: one layer per chunk) and one 1-rank launch of
tests/distributed/workers/surgery.py, which itself checks on every rank that the pruned model's
logits equal the masked unpruned model's, that optimizer surgery keeps every surviving Adam
moment bit-identical, and that a step after surgery has a finite loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.launch import REPO, run_ranks

WORKER = str(REPO / "tests/distributed/workers/surgery.py")


def _surgery(world_size: int, out, tp: int, pp: int, vp: int | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(world_size, [WORKER, str(out), str(tp), str(pp), str(vp or "none")], out / "logs", timeout=90)
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("surgery")
    return _surgery(1, root / "tp1pp1", 1, 1, None), _surgery(4, root / "tp2pp2vp2", 2, 2, 2)


def test_pruned_logits_agree_across_layouts_and_with_the_mask(results):
    base, sharded = results
    assert base["arch"] == sharded["arch"]
    torch.testing.assert_close(sharded["pruned"], base["pruned"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded["pruned"], base["masked"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded["masked"], base["masked"], rtol=1e-5, atol=1e-5)


def test_training_continues_alike_after_surgery(results):
    base, sharded = results
    assert math.isfinite(base["after"]) and math.isfinite(sharded["after"])
    assert sharded["losses"] == pytest.approx(base["losses"], rel=1e-5)
    assert sharded["after"] == pytest.approx(base["after"], rel=1e-5)
    # the moments carried over: the step after surgery keeps lowering the loss on this batch
    assert base["after"] < base["losses"][-1]

"""`efficientllm eval` on real gloo ranks: the pruned checkpoint scored at TP2 PP2, and its
questions split over two data-parallel pipelines (PP2 DP2), gives the numbers of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import run_ranks
from tests.evaluation.conftest import TRAINING_TASKS, TRAINING_TASKS_LIMIT

TASKS = ["--tasks", ",".join(TRAINING_TASKS), "--limit", str(TRAINING_TASKS_LIMIT), "--batch-size", "4"]


def _on_ranks(world: int, out: Path, *args: str) -> dict:
    run_ranks(world, ["-m", "efficientllm", *args, "--output", str(out)], out.parent / f"logs-{out.stem}", timeout=300)
    return json.loads(out.read_text())


def _assert_same_mc(parallel: dict, single: dict) -> None:
    for task, expected in single["tasks"].items():
        got = parallel["tasks"][task]
        assert (got["items"], got["acc"], got["acc_norm"]) == (expected["items"], expected["acc"], expected["acc_norm"])


def test_tp2pp2_gives_the_log_likelihoods_of_one_process(pruned_run, checkpoint_evals, text_file, tmp_path):
    """Every token's log-probability enters the corpus sum: it agrees to 1e-6 only if each does."""
    ppl = _on_ranks(4, tmp_path / "ppl.json", "eval", "ppl", str(pruned_run / "checkpoints"), "--text", str(text_file),
                    "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert ppl["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    single = checkpoint_evals["ppl"]["perplexity"]
    assert ppl["perplexity"]["tokens"] == single["tokens"]
    assert ppl["perplexity"]["loglikelihood"] == pytest.approx(single["loglikelihood"], rel=1e-6)
    assert ppl["perplexity"]["bits_per_byte"] == pytest.approx(single["bits_per_byte"], rel=1e-6)


def test_two_data_parallel_pipelines_split_the_questions_and_agree(pruned_run, checkpoint_evals, tmp_path):
    split = _on_ranks(4, tmp_path / "mc.json", "eval", "mc", str(pruned_run / "checkpoints"), *TASKS, "--pp", "2")
    assert split["layout"] == {"tp": 1, "pp": 2, "dp": 2}
    _assert_same_mc(split, checkpoint_evals["mc"])

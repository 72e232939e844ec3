"""The evaluation inside training runs the same code on the live chunks: its last record equals
`efficientllm eval mc` / `eval ppl` on the checkpoint the run ended with."""

from __future__ import annotations

import json

import pytest

from tests.evaluation.conftest import TRAINING_TASKS, TRAINING_TASKS_LIMIT


def test_the_last_training_eval_equals_eval_mc_and_ppl_on_the_final_checkpoint(pruned_run, checkpoint_evals):
    records = [json.loads(line) for line in (pruned_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    last = evals[-1]
    assert last["tokens"] == 12 * 4 * 128

    # Without --output, a checkpoint of a run directory reports into RUN_DIR/eval/.
    assert sorted(p.name for p in (pruned_run / "eval").iterdir()) == ["mc-iter_0000012.json", "ppl-iter_0000012.json"]
    for task in TRAINING_TASKS:
        ours = checkpoint_evals["mc"]["tasks"][task]
        assert ours["items"] == last[task]["items"] == TRAINING_TASKS_LIMIT and ours["split"] == "validation"
        assert (ours["acc"], ours["acc_norm"]) == (last[task]["acc"], last[task]["acc_norm"])
    text = checkpoint_evals["ppl"]["perplexity"]
    assert text["bits_per_byte"] == pytest.approx(last["text"]["bits_per_byte"], rel=1e-6)
    assert text["max_length"] == 128 and text["documents"] == 1

"""Our numbers are lm-eval's: lm-evaluation-harness 0.4.13 itself, run offline on the same local
data and the same model, builds the same requests and gets the same acc, acc_norm and bits per
byte; on a Hugging Face directory (all seven tasks and a user task) and on our exported pruned
checkpoint."""

from __future__ import annotations

import json

import pytest

from efficientllm.evaluation.documents import read_text_files
from efficientllm.evaluation.hf_lm import HFCausalLM
from efficientllm.evaluation.lm_eval_runner import run_lm_eval
from efficientllm.evaluation.multiple_choice import evaluate_task
from efficientllm.evaluation.perplexity import evaluate_perplexity
from efficientllm.evaluation.tasks import PAPER_TASKS, load_task
from tests.evaluation.conftest import run_cli

LL_TOLERANCE = dict(rel=1e-4, abs=1e-3)  # fp32 sums in another batch layout


def _assert_same_scores(ours: list[list[float]], theirs: list[list[float]]) -> None:
    assert len(ours) == len(theirs)
    for mine, lm_evals in zip(ours, theirs):
        assert mine == pytest.approx(lm_evals, **LL_TOLERANCE)


USER_TASK = [
    {"context": "The capital of France is", "choices": ["Paris", "Rome", "Madrid"], "label": 0},
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "label": 1},
    {"context": "Two plus two is ", "choices": ["four", "five"], "label": 0},  # the space moves to the choice
]


def test_all_seven_tasks_and_a_user_task_get_lm_evals_requests_and_scores(tiny_hf, text_file, tmp_path):
    limit = 12
    user_task = tmp_path / "mine.jsonl"
    user_task.write_text("".join(json.dumps(line) + "\n" for line in USER_TASK))
    tasks = [load_task(name) for name in PAPER_TASKS] + [load_task(str(user_task))]
    documents = read_text_files([text_file])
    theirs = run_lm_eval(tiny_hf, tasks, documents=documents, limit=limit, max_length=256)
    lm = HFCausalLM(tiny_hf, max_length=256)
    for task in tasks:
        ours, reference = evaluate_task(lm, task, limit), theirs["tasks"][task.name]
        assert [[list(r) for r in item.requests] for item in task.items[:limit]] == reference["requests"], task.name
        assert ours.items == reference["items"] == min(limit, len(task.items))
        assert (ours.acc, ours.acc_norm) == (reference["acc"], reference["acc_norm"]), task.name
        _assert_same_scores(ours.loglikelihoods, reference["loglikelihoods"])
    text = evaluate_perplexity(lm, documents)
    assert text.per_document == pytest.approx(theirs["perplexity"]["per_document"], rel=1e-5)
    assert text.bits_per_byte == pytest.approx(theirs["perplexity"]["bits_per_byte"], rel=1e-6)
    assert text.word_perplexity == pytest.approx(theirs["perplexity"]["word_perplexity"], rel=1e-5)


def test_eval_mc_on_a_pruned_checkpoint_equals_lm_eval_on_its_export(pruned_run, checkpoint_evals, text_file,
                                                                     tmp_path):
    """The required check: ≥ 50 items of two tasks, acc and acc_norm identical; bits per byte on a
    text file identical to 6 digits. Ours runs the megatron model on the checkpoint; lm-eval runs
    transformers on `efficientllm eval lm-eval`'s export. Both at the checkpoint's seq_length."""
    checkpoint = pruned_run / "checkpoints"
    common = ["--limit", "60", "--tasks", "arc_easy,hellaswag"]
    ours = run_cli("eval", "mc", str(checkpoint), *common, "--output", str(tmp_path / "ours.json"))
    assert ours.returncode == 0, ours.stderr[-3000:]
    harness = run_cli("eval", "lm-eval", str(checkpoint), *common, "--text", str(text_file),
                      "--export-dir", str(tmp_path / "export"), "--output", str(tmp_path / "lm_eval.json"))
    assert harness.returncode == 0, harness.stderr[-3000:]

    ours, theirs = (json.loads((tmp_path / f).read_text()) for f in ("ours.json", "lm_eval.json"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert ours["max_length"] == theirs["max_length"] == 128
    for task in ("arc_easy", "hellaswag"):
        mine, reference = ours["tasks"][task], theirs["tasks"][task]
        assert mine["items"] == reference["items"] == 60
        assert (mine["acc"], mine["acc_norm"]) == (reference["acc"], reference["acc_norm"]), task
    mine = checkpoint_evals["ppl"]["perplexity"]  # `eval ppl` on the checkpoint, the same text file
    assert mine["bits_per_byte"] == pytest.approx(theirs["perplexity"]["bits_per_byte"], rel=1e-6)
    assert mine["word_perplexity"] == pytest.approx(theirs["perplexity"]["word_perplexity"], rel=1e-5)

"""The evaluation commands' surface: bad input stops with one line naming the file, line or
field (exit 2) before a model is loaded, training-eval settings are checked with the config,
results are written atomically, and `eval ppl --data` on a preprocessed prefix equals `--text`."""

from __future__ import annotations

import json
import re

import pytest

from efficientllm import cli


def _error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("efficientllm: error: ")
    return lines[0].removeprefix("efficientllm: error: ")


def test_an_empty_text_file_is_named(tiny_hf, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert _error(capsys, "eval", "ppl", str(tiny_hf), "--text", str(empty)) == \
        f"text file {empty} is empty: it holds no document to measure"


def test_a_text_file_that_is_not_utf8_is_named(tiny_hf, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert _error(capsys, "eval", "ppl", str(tiny_hf), "--text", str(latin1)).startswith(f"{latin1} is not UTF-8")


def test_a_malformed_task_line_names_the_file_and_line(tiny_hf, tmp_path, capsys):
    task = tmp_path / "mine.jsonl"
    task.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n\n{"context": "b", "choices": "xy", "label": 0}\n')
    message = _error(capsys, "eval", "mc", str(tiny_hf), "--tasks", str(task))
    assert message.startswith(f"{task}:3: ") and '"choices"' in message


def test_an_unknown_task_lists_the_known_ones(tiny_hf, capsys):
    message = _error(capsys, "eval", "mc", str(tiny_hf), "--tasks", "arc_easy,arc_hard")
    assert message.startswith("unknown task 'arc_hard'; known tasks: arc_easy, arc_challenge, boolq")


@pytest.mark.parametrize("flag", ["--limit", "--batch-size", "--max-length"])
def test_counts_must_be_positive(tiny_hf, capsys, flag):
    assert _error(capsys, "eval", "mc", str(tiny_hf), flag, "0") == f"{flag} must be a positive integer, got 0"


def test_a_directory_that_is_neither_a_checkpoint_nor_hugging_face_is_refused(tmp_path, capsys):
    assert _error(capsys, "eval", "mc", str(tmp_path), "--limit", "1", "--tasks", "winogrande").startswith(
        f"no checkpoint in {tmp_path}; give a save directory, an iter_N directory or a Hugging Face directory")


def test_eval_mc_on_a_hugging_face_directory_writes_its_results(tiny_hf, tmp_path, capsys):
    out = tmp_path / "results" / "mc.json"
    assert cli.main(["eval", "mc", str(tiny_hf), "--tasks", "winogrande,piqa", "--limit", "8",
                     "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "winogrande       validation       8" in printed and f"results: {out}" in printed
    record = json.loads(out.read_text())
    assert record["kind"] == "mc" and record["backend"] == "transformers" and record["limit"] == 8
    assert {t: (r["split"], r["items"]) for t, r in record["tasks"].items()} == \
        {"winogrande": ("validation", 8), "piqa": ("validation", 8)}
    assert [p.name for p in out.parent.iterdir()] == ["mc.json"], "no temporary file left"


@pytest.mark.parametrize("overrides, message", [
    (["training.eval_tasks=[arc_easy, arc_hard]"], "training.eval_tasks: unknown task 'arc_hard'; known tasks: "),
    (["training.eval_tasks=[piqa]", "training.eval_interval=0"], "need training.eval_interval > 0"),
    (["training.eval_text=[a.txt]", "training.eval_tasks_limit=0"], "training.eval_tasks_limit must be in [1, inf)"),
])
def test_training_eval_settings_are_checked_when_the_config_loads(overrides, message):
    from efficientllm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_eval_ppl_on_a_preprocessed_prefix_equals_it_on_the_text(tiny_hf, text_file, tmp_path):
    from efficientllm.data.preprocess import preprocess_files
    from efficientllm.data.tokenizer import load_tokenizer

    preprocess_files([text_file], load_tokenizer(tiny_hf), tmp_path / "held")
    results = {}
    for source in (["--text", str(text_file)], ["--data", str(tmp_path / "held")]):
        out = tmp_path / f"{source[0][2:]}.json"
        assert cli.main(["eval", "ppl", str(tiny_hf), "--max-length", "64", *source, "--output", str(out)]) == 0
        results[source[0]] = json.loads(out.read_text())["perplexity"]
    text, data = results["--text"], results["--data"]
    counts = ("documents", "tokens", "bytes", "words")
    assert [data[k] for k in counts] == [text[k] for k in counts]
    assert text["documents"] == 1 and text["bytes"] == len(text_file.read_bytes())
    assert data["loglikelihood"] == pytest.approx(text["loglikelihood"], rel=1e-9)


def test_a_missing_data_prefix_is_named_before_the_model_loads(tmp_path, capsys):
    message = _error(capsys, "eval", "ppl", str(tmp_path / "no_model"), "--data", str(tmp_path / "absent"))
    assert message.startswith(f"data prefix {tmp_path / 'absent'}: {tmp_path / 'absent'}.bin not found")

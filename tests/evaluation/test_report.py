"""`efficientllm report`: the Markdown and its figures for a pruned run, two runs compared, and
a directory that is no run refused in one line."""

from __future__ import annotations

import json
import shutil

from efficientllm import cli
from efficientllm.architecture import Architecture
from efficientllm.reporting.report import write_report
from tests.evaluation.conftest import TRAINING_TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss.png", "parameters.png", "pruning.png", "widths.png", "training_evals.png")


def test_a_pruned_runs_report_has_every_figure_the_architecture_and_its_evals(pruned_run, tmp_path):
    report = write_report(pruned_run, output=tmp_path / "report")
    text = report.read_text()
    for figure in FIGURES:
        assert f"]({figure})" in text
        assert (report.parent / figure).read_bytes()[:8] == PNG_MAGIC
    final = Architecture.from_json((pruned_run / "architecture.json").read_text())
    assert f"| parameters (final) | {final.num_parameters():,} |" in text
    for i, layer in enumerate(final.layers):
        assert f"| {i} | {layer.num_attention_heads} | {layer.num_query_groups} | {layer.ffn_hidden_size} |" in text
    last = [json.loads(line) for line in (pruned_run / "metrics.jsonl").read_text().splitlines()
            if '"kind": "eval"' in line][-1]
    for task in TRAINING_TASKS:
        assert f"{last[task]['acc']:.4f} / {last[task]['acc_norm']:.4f}" in text
    assert f"{last['text']['bits_per_byte']:.4f}" in text


def test_compared_runs_share_the_figures_and_the_summary_table(pruned_run, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(pruned_run, other, ignore=shutil.ignore_patterns("checkpoints", "report", "eval"))
    report = write_report(pruned_run, [other], output=tmp_path / "compared")
    text = report.read_text()
    assert text.startswith(f"# Run report: {pruned_run.name} vs other_run")
    assert f"|  | {pruned_run.name} | other_run |" in text
    assert "## Architecture: other_run" in text
    assert all((report.parent / f).read_bytes()[:8] == PNG_MAGIC for f in FIGURES)


def test_a_directory_without_metrics_is_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"efficientllm: error: {tmp_path} is not a run directory: {tmp_path / 'metrics.jsonl'} not found"
    assert not (tmp_path / "report").exists()

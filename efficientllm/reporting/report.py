"""`efficientllm report RUN_DIR [--compare RUN_DIR...]`: a Markdown report plus its figures.

It shows loss and held-out bits per byte vs tokens, parameter count vs tokens, the pruning
figure (pruned fraction, saliency and score per parameter per kind vs tokens), the final
per-layer widths, the architecture table and every evaluation found in the run. With
`--compare`, the runs share the figures' axes and the summary table has a column per run.
The report directory is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from efficientllm.architecture import Architecture
from efficientllm.atomic import fresh_sibling_dir, replace_dir
from efficientllm.reporting import figures
from efficientllm.reporting.run import RunData, read_run

REPORT_FILE = "report.md"


def write_report(run_dir: str | Path, compare: Sequence[str | Path] = (), output: str | Path | None = None) -> Path:
    """Write the report of `run_dir` (and the runs to compare with it); returns report.md."""
    runs = [read_run(run_dir)] + [read_run(path) for path in compare]
    out = Path(output) if output else Path(run_dir) / "report"
    tmp = fresh_sibling_dir(out)
    try:
        made = {name: plot(runs, tmp / f"{name}.png") for name, plot in _FIGURES.items()}
        (tmp / REPORT_FILE).write_text(render(runs, {k: v.name for k, v in made.items() if v}))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / REPORT_FILE


_FIGURES: dict[str, Callable[[Sequence[RunData], Path], Path | None]] = {
    "loss": figures.plot_loss,
    "parameters": figures.plot_parameters,
    "pruning": figures.plot_pruning,
    "widths": figures.plot_widths,
    "training_evals": figures.plot_training_evals,
}


# ----- Markdown ---------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _last(run: RunData, kind: str) -> dict[str, Any] | None:
    records = run.records.get(kind)
    return records[-1] if records else None


def _latest_scores(run: RunData) -> dict[str, dict[str, Any]]:
    """Per task, the newest score: an `eval mc`/`lm-eval` file, else the last in-training eval."""
    scores: dict[str, dict[str, Any]] = {}
    last_eval = _last(run, "eval") or {}
    for name, value in last_eval.items():
        if isinstance(value, dict) and "acc" in value:
            scores[name] = {**value, "from": f"training step {last_eval['step']}"}
    for file, result in run.eval_files.items():
        for name, value in result.get("tasks", {}).items():
            scores[name] = {**value, "from": file}
    return scores


def _bits_per_byte(run: RunData) -> tuple[float, str] | None:
    found = None
    last_eval = _last(run, "eval") or {}
    if figures.TEXT in last_eval:
        found = (last_eval[figures.TEXT]["bits_per_byte"], f"training step {last_eval['step']}")
    for file, result in run.eval_files.items():
        if "perplexity" in result:
            found = (result["perplexity"]["bits_per_byte"], file)
    return found


def _summary(runs: Sequence[RunData]) -> str:
    def row(label: str, cell: Callable[[RunData], str]) -> list[str]:
        return [label] + [cell(r) for r in runs]

    def final_params(r: RunData) -> str:
        return _num(r.final.num_parameters()) if r.final else "–"

    def tokens(r: RunData) -> str:
        last = _last(r, "train")
        return _num(int(r.tokens_at(last))) if last and r.tokens_per_step else "–"

    def valid(r: RunData) -> str:
        last = _last(r, "valid")
        return f"{last['loss']:.4f} / {last['ppl']:.2f} (step {last['step']})" if last else "–"

    def bpb(r: RunData) -> str:
        found = _bits_per_byte(r)
        return f"{found[0]:.4f} ({found[1]})" if found else "–"

    rows = [
        row("parameters (final)", final_params),
        row("parameters (source)", lambda r: _num(r.source.num_parameters()) if r.source else "–"),
        row("tokens trained", tokens),
        row("last training loss", lambda r: _num((_last(r, "train") or {}).get("loss"))),
        row("held-out loss / perplexity", valid),
        row("bits per byte", bpb),
    ]
    tasks = sorted({name for r in runs for name in _latest_scores(r)})
    for task in tasks:
        def score(r: RunData, task: str = task) -> str:
            s = _latest_scores(r).get(task)
            return f"{s['acc']:.4f} / {s['acc_norm']:.4f} ({s['items']} items)" if s else "–"

        rows.append(row(f"{task} acc / acc_norm", score))
    return _table(["", *[r.name for r in runs]], rows)


def _architecture(run: RunData) -> str:
    arch: Architecture = run.final
    source = run.source if run.source is not None and run.source.num_layers == arch.num_layers else None
    header = ["layer", "heads", "KV groups", "FFN", "parameters"] + (["source heads / KV / FFN"] if source else [])
    rows = []
    for i, layer in enumerate(arch.layers):
        row = [i, layer.num_attention_heads, layer.num_query_groups, layer.ffn_hidden_size, _num(arch.layer_parameters(layer))]
        if source:
            s = source.layers[i]
            row.append(f"{s.num_attention_heads} / {s.num_query_groups} / {s.ffn_hidden_size}")
        rows.append(row)
    note = (f"hidden {arch.hidden_size}, head_dim {arch.head_dim}, vocab {arch.vocab_size}, "
            f"{'tied' if arch.tie_embeddings else 'untied'} embeddings, {arch.num_parameters():,} parameters"
            + (f" (source: hidden {source.hidden_size}, {source.num_parameters():,} parameters)" if source else ""))
    return _table(header, rows) + "\n\n" + note


def _training_evals(run: RunData) -> str | None:
    records = run.records.get("eval", [])
    if not records:
        return None
    tasks = sorted({k for e in records for k, v in e.items() if isinstance(v, dict) and "acc" in v})
    with_text = any(figures.TEXT in e for e in records)
    header = ["step", "tokens"] + [f"{t} acc / acc_norm" for t in tasks] + (["bits per byte"] if with_text else [])
    rows = []
    for e in records:
        row = [e["step"], _num(int(run.tokens_at(e)))]
        row += [f"{e[t]['acc']:.4f} / {e[t]['acc_norm']:.4f}" if t in e else "–" for t in tasks]
        if with_text:
            row.append(_num(e.get(figures.TEXT, {}).get("bits_per_byte")))
        rows.append(row)
    items = {t: next(e[t] for e in records if t in e) for t in tasks}
    detail = ", ".join(f"{t}: {v['items']} items of {v['split']}" for t, v in items.items())
    return _table(header, rows) + (f"\n\n{detail}" if detail else "")


def _eval_file(name: str, result: dict[str, Any]) -> str:
    where = result.get("checkpoint") or result.get("model", "?")
    layout = result.get("layout")
    about = [f"`efficientllm eval {result.get('kind', '?')}`", f"backend {result.get('backend', '?')}",
             f"model `{where}`"]
    if result.get("iteration") is not None:
        about.append(f"iteration {result['iteration']:,}")
    if layout:
        about.append(f"TP{layout['tp']} PP{layout['pp']} DP{layout['dp']}")
    if result.get("lm_eval_version"):
        about.append(f"lm-eval {result['lm_eval_version']}")
    parts = [f"**{name}**: " + ", ".join(about)]
    if result.get("tasks"):
        parts.append(_table(["task", "split", "items", "acc", "acc_norm"],
                            [[t, r.get("split", "–"), r["items"], _num(r["acc"]), _num(r["acc_norm"])]
                             for t, r in result["tasks"].items()]))
    if result.get("perplexity"):
        p = result["perplexity"]
        parts.append(_table(["documents", "bytes", "bits per byte", "token perplexity", "word perplexity"],
                            [[p.get("documents", "–"), _num(p.get("bytes")), _num(p.get("bits_per_byte")),
                              _num(p.get("token_perplexity"), 3), _num(p.get("word_perplexity"), 3)]]))
    return "\n\n".join(parts)


def render(runs: Sequence[RunData], images: dict[str, str]) -> str:
    title = runs[0].name if len(runs) == 1 else " vs ".join(r.name for r in runs)
    out = [f"# Run report: {title}", "", "Runs: " + ", ".join(f"`{r.name}` ({r.path.resolve()})" for r in runs), "",
           "## Summary", "", _summary(runs), ""]
    sections = [
        ("loss", "Loss and held-out bits per byte", "Training loss per step and held-out loss at every evaluation; "
                 "bits per byte of `training.eval_text` when the run measured it."),
        ("parameters", "Parameter count", "After every pruning event."),
        ("pruning", "Pruning per kind", "Fraction of each kind removed, mean saliency of what each event removed, "
                    "and each kind's score per parameter at each event."),
        ("widths", "Final per-layer widths", "Bars: the final model; dashed outlines: the source model."),
        ("training_evals", "Zero-shot accuracy during training", "`training.eval_tasks`, every eval_interval steps."),
    ]
    for key, heading, caption in sections:
        out += [f"## {heading}", ""]
        out += [caption, "", f"![{heading}]({images[key]})"] if key in images else ["Not recorded in this run."]
        out.append("")
    for run in runs:
        if run.final is not None:
            out += [f"## Architecture: {run.name}", "", _architecture(run), ""]
    for run in runs:
        out += [f"## Evaluations: {run.name}", ""]
        training = _training_evals(run)
        if training:
            out += ["During training (metrics.jsonl):", "", training, ""]
        for name, result in run.eval_files.items():
            out += [_eval_file(name, result), ""]
        if not training and not run.eval_files:
            out += ["None found (metrics.jsonl `eval` records, or eval/*.json from `efficientllm eval`).", ""]
    return "\n".join(out)

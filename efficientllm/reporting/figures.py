"""The report's figures, each for one run or several overlaid on the same axes (colour: what is
plotted; line style: which run). Every function writes one PNG and returns its path, or None
when no run has what it plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402

from efficientllm.reporting.plots import KIND_COLOURS  # noqa: E402
from efficientllm.reporting.run import RunData  # noqa: E402

LINE_STYLES = ("-", "--", ":", "-.")
RUN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
TEXT = "text"  # the bits-per-byte entry of an eval record
DPI = 110


def _style(index: int) -> str:
    return LINE_STYLES[index % len(LINE_STYLES)]


def _tokens_axis(ax, ylabel: str, title: str) -> None:
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set(xlabel="tokens", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _bits_per_byte(run: RunData) -> tuple[list[float], list[float]]:
    points = [(run.tokens_at(r), r[TEXT]["bits_per_byte"]) for r in run.records.get("eval", []) if TEXT in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss(runs: Sequence[RunData], out: Path) -> Path | None:
    """Training and held-out loss vs tokens; held-out bits per byte vs tokens when recorded."""
    if not any(r.records.get("train") for r in runs):
        return None
    with_bpb = any(_bits_per_byte(r)[0] for r in runs)
    fig, axes = plt.subplots(1, 2 if with_bpb else 1, figsize=(13 if with_bpb else 7.5, 4.5), squeeze=False)
    loss_ax = axes[0][0]
    for i, run in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        prefix = f"{run.name} " if len(runs) > 1 else ""
        tokens, loss = run.series("train", "loss")
        loss_ax.plot(tokens, loss, color=colour, alpha=0.8, linewidth=1, label=f"{prefix}training")
        tokens, valid = run.series("valid", "loss")
        if valid:
            loss_ax.plot(tokens, valid, "o-", color=colour, markersize=4, linewidth=1.5, label=f"{prefix}held-out")
    _tokens_axis(loss_ax, "loss (nats per token)", "loss")
    loss_ax.legend()
    if with_bpb:
        bpb_ax = axes[0][1]
        for i, run in enumerate(runs):
            tokens, bpb = _bits_per_byte(run)
            if bpb:
                bpb_ax.plot(tokens, bpb, "o-", color=RUN_COLOURS[i % len(RUN_COLOURS)], markersize=4, label=run.name)
        _tokens_axis(bpb_ax, "bits per byte", "held-out bits per byte (training.eval_text)")
        bpb_ax.legend()
    return _save(fig, out)


def _parameter_points(run: RunData) -> tuple[list[float], list[float]]:
    points = [(run.tokens_at(r), r["params"]) for r in run.records.get("train", []) if r.get("params")]
    points += [(r["tokens"], r["params_after"]) for r in run.records.get("prune", [])]
    if run.source is not None:
        points.append((0.0, run.source.num_parameters()))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def plot_parameters(runs: Sequence[RunData], out: Path) -> Path | None:
    if not any(_parameter_points(r)[0] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, run in enumerate(runs):
        tokens, params = _parameter_points(run)
        ax.step(tokens, params, where="post", color=RUN_COLOURS[i % len(RUN_COLOURS)], label=run.name)
    ax.yaxis.set_major_formatter(EngFormatter())
    _tokens_axis(ax, "parameters", "parameter count")
    ax.legend()
    return _save(fig, out)


# The prune record fields plotted per kind, with their axis label and scale.
_PRUNING_PANELS = (
    ("ratio", "fraction of the source removed", "pruned fraction per kind", "linear"),
    ("saliency", "mean saliency of the removed groups", "saliency of what was removed", "log"),
    ("score_per_param", "saliency per parameter", "score per parameter of each kind", "log"),
)


def plot_pruning(runs: Sequence[RunData], out: Path) -> Path | None:
    """The paper's appendix figure: per kind, the pruned fraction and the saliency of what each
    event removed vs tokens, and the score per parameter each kind had at each event."""
    events = [(run, run.records.get("prune", [])) for run in runs]
    if not any(e for _, e in events):
        return None
    panels = [p for p in _PRUNING_PANELS if any(p[0] in e for _, es in events for e in es)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel, title, scale) in zip(axes[0], panels):
        for i, (run, records) in enumerate(events):
            tokens = [e["tokens"] for e in records]
            # "params" in a ratio record is the fraction of all parameters removed so far.
            kinds = {**KIND_COLOURS, "params": "black"} if key == "ratio" else KIND_COLOURS
            for kind, colour in kinds.items():
                values = [e.get(key, {}).get(kind) for e in records]
                if key == "ratio" and not any(values):
                    continue
                if key != "ratio" and all(v is None for v in values):
                    continue
                name = "all parameters" if kind == "params" else kind
                label = name if len(runs) == 1 else f"{name} ({run.name})"
                ax.plot(tokens, [v if v is not None else float("nan") for v in values], color=colour,
                        linestyle=_style(i), marker="." if len(tokens) < 40 else None, label=label)
        ax.set_yscale(scale)
        _tokens_axis(ax, ylabel, title)
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_widths(runs: Sequence[RunData], out: Path) -> Path | None:
    """Final per-layer query heads, KV groups and FFN channels as bars (source as outlines)."""
    finals = [r for r in runs if r.final is not None]
    if not finals:
        return None
    fields = (("num_attention_heads", "query heads"), ("num_query_groups", "KV groups"), ("ffn_hidden_size", "FFN channels"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / len(finals)
    for ax, (field, label) in zip(axes, fields):
        for i, run in enumerate(finals):
            layers = range(run.final.num_layers)
            xs = [x - 0.4 + width * (i + 0.5) for x in layers]
            colour = RUN_COLOURS[i % len(RUN_COLOURS)]
            ax.bar(xs, [getattr(l, field) for l in run.final.layers], width=width * 0.9, color=colour,
                   label=f"{run.name} final" if len(finals) > 1 else "final")
            if run.source is not None and run.source.num_layers == run.final.num_layers:
                ax.bar(xs, [getattr(l, field) for l in run.source.layers], width=width * 0.9, fill=False,
                       edgecolor=colour, linestyle="--", label=f"{run.name} source" if len(finals) > 1 else "source")
        ax.set(xlabel="layer", ylabel=label, title=f"{label} per layer")
        ax.set_xticks(range(max(r.final.num_layers for r in finals)))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
    # One legend for the three panels, above them, where it hides no bar.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_training_evals(runs: Sequence[RunData], out: Path) -> Path | None:
    """acc (solid) and acc_norm (dotted) of every task evaluated during training, vs tokens."""
    tasks = sorted({name for r in runs for e in r.records.get("eval", []) for name, v in e.items()
                    if isinstance(v, dict) and "acc" in v})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(7.5 * len(runs), 4.5), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, run in zip(axes[0], runs):
        records = run.records.get("eval", [])
        for t, task in enumerate(tasks):
            points = [(run.tokens_at(e), e[task]) for e in records if task in e]
            if not points:
                continue
            tokens = [p[0] for p in points]
            ax.plot(tokens, [p[1]["acc"] for p in points], "o-", color=colours(t), markersize=3, label=f"{task} acc")
            ax.plot(tokens, [p[1]["acc_norm"] for p in points], ":", color=colours(t), label=f"{task} acc_norm")
        _tokens_axis(ax, "accuracy", f"zero-shot accuracy during training ({run.name})")
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)

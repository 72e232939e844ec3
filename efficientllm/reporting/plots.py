"""The pruning figure: per-kind pruning ratio and saliency vs. tokens, and the per-layer widths
the run ended with (the paper's appendix figure, for this run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

from efficientllm.architecture import Architecture  # noqa: E402

KIND_COLOURS = {"head": "tab:blue", "ffn": "tab:orange", "hidden": "tab:green", "layer": "tab:red"}


def read_records(metrics_path: Path, kind: str) -> list[dict[str, Any]]:
    with metrics_path.open() as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def plot_pruning(events: list[dict[str, Any]], source: Architecture, final: Architecture, out: Path) -> Path:
    """Write a PNG with three panels; `events` are the `prune` records of metrics.jsonl."""
    fig, (ratio_ax, saliency_ax, width_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    tokens = [e["tokens"] / 1e6 for e in events]
    for kind, colour in KIND_COLOURS.items():
        ratios = [e["ratio"].get(kind) for e in events]
        if any(r for r in ratios if r is not None):
            ratio_ax.plot(tokens, [r or 0.0 for r in ratios], label=kind, color=colour)
        saliency = [e["saliency"].get(kind) for e in events]
        if any(s is not None for s in saliency):
            saliency_ax.plot(tokens, [s if s is not None else float("nan") for s in saliency],
                             label=kind, color=colour)
    ratio_ax.set(title="pruned fraction per kind", xlabel="tokens (M)", ylabel="fraction removed")
    saliency_ax.set(title="mean saliency of the groups removed", xlabel="tokens (M)", ylabel="saliency (score per group)")
    saliency_ax.set_yscale("log")
    for ax in (ratio_ax, saliency_ax):
        ax.legend()
        ax.grid(alpha=0.3)

    layers = range(final.num_layers)
    src = source.layers
    width_ax.bar([i - 0.2 for i in layers], [l.num_attention_heads / src[i].num_attention_heads
                                             for i, l in enumerate(final.layers)],
                 width=0.4, label="heads kept", color=KIND_COLOURS["head"])
    width_ax.bar([i + 0.2 for i in layers], [l.ffn_hidden_size / src[i].ffn_hidden_size
                                             for i, l in enumerate(final.layers)],
                 width=0.4, label="ffn kept", color=KIND_COLOURS["ffn"])
    width_ax.axhline(final.hidden_size / source.hidden_size, color=KIND_COLOURS["hidden"],
                     linestyle="--", label="hidden kept")
    width_ax.set(title=f"per-layer widths ({final.num_parameters() / 1e6:.2f}M of "
                       f"{source.num_parameters() / 1e6:.2f}M params)",
                 xlabel="layer", ylabel="fraction of source width", ylim=(0, 1.05))
    width_ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

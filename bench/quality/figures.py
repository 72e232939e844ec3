"""Figures and the summary of the quality experiment, from the runs under runs/quality/.

Writes into docs/results/: quality.json (every arm's final figures, means and spreads over seeds,
and the comparisons the issue's goals name), quality-<source>-bpb.png (held-out bits per byte vs
tokens after the source, every arm on one axis), quality-<source>-widths.png (per-layer widths of
A vs the uniform target) and quality-<source>-pruning.png (A's own pruning figure).
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from efficientllm.architecture import Architecture  # noqa: E402
from efficientllm.atomic import write_atomically  # noqa: E402

ARM_STYLE = {  # colour per family, line style per variant
    "source": ("black", ":"), "A": ("tab:blue", "-"), "A-no-obs": ("tab:cyan", "--"),
    "A-taylor": ("tab:cyan", "-."), "A-per-group": ("tab:purple", "--"),
    "A-kind-weights": ("tab:purple", "-."), "A-no-rms-correction": ("tab:cyan", ":"),
    "A-hidden-0.1": ("tab:pink", "-."),
    "A-hidden-0.05": ("tab:pink", ":"), "A-hidden-0.02": ("tab:gray", "-."), "A-early": ("tab:brown", "--"), "A-early-kind-weights": ("tab:brown", "-."),
    "A-late-kind-weights": ("tab:brown", ":"), "A-taylor-kind-weights": ("tab:pink", "--"),
    "A-hidden-0.1-every-4": ("navy", "-"), "A-hidden-0.1-every-8": ("navy", "--"),
    "A-hidden-0.1-every-8-window-8": ("navy", ":"),
    "A-group-fisher": ("teal", "-"), "A-group-fisher-hidden-0.5": ("teal", "--"),
    "A-group-fisher-slow-ema": ("teal", ":"), "A-group-fisher-every-4": ("teal", "-."),
    "A-group-fisher-hidden-0.5-every-4": ("darkgoldenrod", "-."),
    "A-after-obs": ("darkviolet", "-"), "A-after-obs-every-4": ("darkviolet", "--"),
    "A-group-fisher-after-obs-every-4": ("darkviolet", "-."),
    "B1": ("tab:orange", "-"), "B2": ("tab:red", "-"), "B3": ("tab:red", ":"),
    "C1": ("tab:green", "-"), "C2": ("tab:olive", "-"),
}


WIDTHS_SHOWN = ("A", "A-hidden-0.1", "A-hidden-0.1-every-4")  # the default and the best ablations measured


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


def _final(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "eval" / "final.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    ppl = result["ppl"]["perplexity"]
    out = {"bits_per_byte": ppl["bits_per_byte"], "token_perplexity": ppl["token_perplexity"],
           "documents": ppl.get("documents"), "bytes": ppl.get("bytes"), "tokens": ppl.get("tokens")}
    arch_file = run_dir / "architecture.json"
    if arch_file.is_file():
        out["params"] = Architecture.from_json(arch_file.read_text()).num_parameters()
    trains = _records(run_dir, "train")
    if trains:
        out["train_tokens"] = trains[-1].get("tokens")
        out["steps"] = trains[-1]["step"]
    if "mc" in result:
        out["tasks"] = {name: {k: r[k] for k in ("acc", "acc_norm", "items", "split") if k in r}
                        for name, r in result["mc"].get("tasks", {}).items()}
        out["above_chance"] = above_chance(out["tasks"])
    return out


# Chance accuracy of each zero-shot task (ARC: nearly all items have four choices), and the
# accuracy reported for it: length-normalised where the choices are sentences of different length.
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "openbookqa": 0.25, "piqa": 0.5,
          "boolq": 0.5, "winogrande": 0.5}
NORMALISED = {"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa"}


def above_chance(tasks: dict[str, dict[str, Any]]) -> float:
    """Mean accuracy above chance over the tasks (acc_norm where NORMALISED, else acc)."""
    return statistics.fmean(r["acc_norm" if name in NORMALISED else "acc"] - CHANCE[name] for name, r in tasks.items())


def collect(root: Path) -> dict[str, Any]:
    """{source: {seed: {arm: final figures}}} for every finished arm."""
    out: dict[str, Any] = {}
    for source_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for seed_dir in sorted(p for p in source_dir.iterdir() if p.is_dir() and p.name.startswith("seed")):
            arms = {arm.name: f for arm in sorted(seed_dir.iterdir()) if arm.is_dir() and (f := _final(arm))}
            if arms:
                out.setdefault(source_dir.name, {})[seed_dir.name] = arms
    return out


def _mean_spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Means and spreads over seeds, and each pruning-aware arm's (A and its ablations) held-out
    perplexity change against the baselines and against plain A (negative = better), per seed
    and on average."""
    summary: dict[str, Any] = {}
    for source, seeds in results.items():
        arms = sorted({arm for per_seed in seeds.values() for arm in per_seed})
        s: dict[str, Any] = {"arms": {}, "vs": {}}
        for arm in arms:
            values = [per_seed[arm] for per_seed in seeds.values() if arm in per_seed]
            s["arms"][arm] = {key: _mean_spread([v[key] for v in values])
                              for key in ("bits_per_byte", "token_perplexity", "above_chance")
                              if all(key in v for v in values)}
        for mine in (a for a in arms if a.startswith("A")):
            for other in (a for a in arms if not a.startswith("A") or (a == "A" != mine)):
                changes = [per_seed[mine]["token_perplexity"] / per_seed[other]["token_perplexity"] - 1
                           for per_seed in seeds.values() if mine in per_seed and other in per_seed]
                if changes:
                    s["vs"].setdefault(mine, {})[other] = _mean_spread(changes)
        summary[source] = s
    return summary


def plot_bpb(seed_dir: Path, out: Path, title: str) -> Path | None:
    """Held-out bits per byte vs tokens after the source, every arm of one seed on one axis;
    beside it the final figures ranked, where the arms' stars lie too close to tell apart."""
    fig, (ax, ranked) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    drawn, finals = 0, []
    source_final = _final(seed_dir / "source")
    for arm_dir in sorted(seed_dir.iterdir()):
        if not arm_dir.is_dir() or arm_dir.name == "source":
            continue
        # The curve is the in-training eval on the first 40 kB of held-out files; the final
        # figure (a star) is on more of them, so the two are different texts and are not joined.
        points = [(r["tokens"], r["text"]["bits_per_byte"]) for r in _records(arm_dir, "eval")
                  if isinstance(r.get("text"), dict)]
        final = _final(arm_dir)
        if not points and not final:
            continue
        colour, style = ARM_STYLE.get(arm_dir.name, ("grey", "-"))
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot([x / 1e6 for x in xs], ys, style, color=colour, marker="o", markersize=3, label=arm_dir.name)
        if final and final.get("train_tokens"):
            ax.plot([final["train_tokens"] / 1e6], [final["bits_per_byte"]], "*", color=colour, markersize=11,
                    label=None if points else arm_dir.name)
        if final:
            finals.append((final["bits_per_byte"], arm_dir.name, colour))
        drawn += 1
    if source_final:
        ax.axhline(source_final["bits_per_byte"], color="black", linestyle=":", label="source, final evaluation")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("tokens after the source (millions)")
    ax.set_ylabel("held-out bits per byte (lower is better)\nlines: during training, first 40 kB; stars: final evaluation")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=7)
    finals.sort(reverse=True)  # the best at the top
    for y, (bpb, name, colour) in enumerate(finals):
        ranked.plot([bpb], [y], "o", color=colour)
    ranked.set_yticks(range(len(finals)), [name for _, name, _ in finals], fontsize=8)
    if source_final:
        ranked.axvline(source_final["bits_per_byte"], color="black", linestyle=":")
    ranked.set_xlabel("final held-out bits per byte (lower is better)")
    ranked.set_title("final figures, ranked")
    ranked.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_widths(found: dict[str, Architecture], uniform: Architecture, out: Path, title: str) -> Path:
    """Per-layer query heads and FFN channels: what each pruning-aware arm found vs the uniform
    target, one bar per architecture and layer."""
    shapes = {**{f"{arm} (found)": arch for arm, arch in found.items()}, "uniform target": uniform}
    colours = {label: ARM_STYLE.get(label.split(" ")[0], ("grey", "-"))[0] for label in shapes}
    colours["uniform target"] = "tab:red"
    layers = range(uniform.num_layers)
    width = 0.8 / len(shapes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, field, label in ((axes[0], "num_attention_heads", "query heads"),
                             (axes[1], "ffn_hidden_size", "FFN channels")):
        for i, (name, arch) in enumerate(shapes.items()):
            offset = (i - (len(shapes) - 1) / 2) * width
            ax.bar([l + offset for l in layers], [getattr(w, field) for w in arch.layers], width,
                   label=f"{name}, hidden {arch.hidden_size}", color=colours[name])
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_xticks(list(layers)[::max(1, len(layers) // 10)])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(shapes), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _uniform_target(seed_dir: Path) -> Architecture | None:
    """The uniform target, from the B2 run (or a C run's pruned result)."""
    for arm in ("B2", "C1", "C2"):
        path = seed_dir / arm / "architecture.json"
        if path.is_file():
            return Architecture.from_json(path.read_text())
    return None


def recorded_elsewhere(previous: Path, measured: dict[str, Any]) -> dict[str, Any]:
    """The results in an earlier quality.json of the sources with no runs here: runs/ stays on
    the machine that made it, docs/ is committed, so a source is replaced only when re-run."""
    if not previous.is_file():
        return {}
    return {source: seeds for source, seeds in json.loads(previous.read_text())["results"].items()
            if source not in measured}


def main(root: Path, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    measured = collect(root)
    results = {**recorded_elsewhere(docs / "quality.json", measured), **measured}
    record = {"results": dict(sorted(results.items())), "summary": summarise(results)}
    write_atomically(docs / "quality.json", json.dumps(record, indent=1))
    for source, seeds in measured.items():  # the figures of the others stay as committed
        seed_dir = root / source / sorted(seeds)[0]
        plot_bpb(seed_dir, docs / f"quality-{source}-bpb.png",
                 f"{source}: held-out bits per byte vs tokens ({seed_dir.name})")
        found = {arm: Architecture.from_json((seed_dir / arm / "architecture.json").read_text())
                 for arm in WIDTHS_SHOWN if (seed_dir / arm / "architecture.json").is_file()}
        uniform = _uniform_target(seed_dir)
        if found and uniform is not None:
            plot_widths(found, uniform, docs / f"quality-{source}-widths.png",
                        f"{source}: per-layer widths found by pruning-aware pretraining vs the uniform target ({seed_dir.name})")
        if (seed_dir / "A" / "pruning.png").is_file():
            shutil.copy(seed_dir / "A" / "pruning.png", docs / f"quality-{source}-pruning.png")
    print(json.dumps(record["summary"], indent=1))

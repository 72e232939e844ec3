"""The quality experiment (issue 13): pruning-aware pretraining vs direct pretraining vs prune-once.

    python bench/quality/quality.py tiny [--seeds 1 2] [--ablation-seeds 1] [--arms A,B2,...] [--scale 0.5]
    python bench/quality/quality.py smollm2 [--arms A,C1,C2] [--limit 100] [--scale 0.25]
    python bench/quality/quality.py figures     # docs/results/*.png and docs/results/quality.json

Sources: `tiny` is the default job's 6.8M-parameter shape pretrained here on English prose
(`data.corpus: english_docs`, Python and Linux documentation), one source per seed; `smollm2`
is the real SmolLM2-135M, continued on the same prose with its own tokenizer. Every arm's runs
live under runs/quality/<source>/seed<k>/<arm>/ and are skipped when already complete, so the
command can be rerun after an interruption. Quality is held-out bits per byte on whole held-out
files (`efficientllm eval ppl`; for SmolLM2 the first 100 kB of them), and for SmolLM2 also the
seven zero-shot tasks (`efficientllm eval mc`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.quality.arms import ABLATIONS, MAIN_ARMS, ArmFactory, Budget  # noqa: E402
from efficientllm.architecture import Architecture, model_shape_fields  # noqa: E402
from efficientllm.data.corpus import english_docs_corpus  # noqa: E402
from efficientllm.pruning.selection import Constraints  # noqa: E402
from efficientllm.pruning.targets import propose_uniform  # noqa: E402

CLI = [sys.executable, "-m", "efficientllm"]
ROOT = REPO / "runs" / "quality"
CORPUS = {"heldout_fraction": 0.05, "max_bytes": 8_000_000}
CURVE_BYTES = 40_000  # held-out text evaluated during training (the curves); the final figure uses all
PAPER_TASKS = "arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande"

PRUNE = {"align": 8, "min_heads_per_layer": 2, "min_ffn_per_layer": 64, "min_hidden": 64}
TINY_SOURCE = {
    "model": {"hidden_size": 256, "num_layers": 6, "num_attention_heads": 8, "num_query_groups": 4,
              "ffn_hidden_size": 768},
    "data": {"corpus": "english_docs", "corpus_max_bytes": CORPUS["max_bytes"],
             "corpus_heldout_fraction": CORPUS["heldout_fraction"], "seq_length": 256,
             "tokenizer_vocab_size": 4096},
    "training": {"micro_batch_size": 8, "global_batch_size": 8, "train_iters": 600, "lr": 1e-3,
                 "min_lr": 1e-4, "lr_warmup_iters": 25, "log_interval": 25, "eval_interval": 100,
                 "eval_iters": 4, "tensorboard": False},
    "checkpoint": {"save_interval": None, "keep_last": 1},
    "prune": {"enabled": False, **PRUNE},
}
TINY_BUDGET = Budget(budget_steps=400, prune_start=20, prune_end=220, finetune_lr=5e-4, scratch_lr=1e-3, warmup=10)
TINY_TARGET_RATIO = 0.4

SMOL_BUDGET = Budget(budget_steps=120, prune_start=10, prune_end=70, finetune_lr=1e-4, scratch_lr=1e-3, warmup=5)
SMOL_SOURCE = {
    "data": {"seq_length": 256},
    "training": {"micro_batch_size": 2, "global_batch_size": 2, "train_iters": 120, "log_interval": 10,
                 "eval_interval": 40, "eval_iters": 4, "tensorboard": False},
    "checkpoint": {"save_interval": None, "keep_last": 1},
    "prune": {"enabled": False, "align": 64, "min_heads_per_layer": 3, "min_query_groups": 1,
              "min_ffn_per_layer": 256, "min_hidden": 256},
    "saliency": {"hessian_window": 4},
}
SMOL_KEEP_NON_EMBEDDING = 0.65  # of SmolLM2's non-embedding parameters
# Every SmolLM2 model is scored with 2048-token windows (its pretraining context), not with its
# checkpoint's default: the source's is 8192, an arm's the 256 it was trained at.
SMOL_EVAL_LENGTH = 2048
SMOL_HELDOUT_BYTES = 100_000  # its first held-out files (all 400 kB took SmolLM2 over 20 min per model here)


def say(text: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"command failed ({code}): {' '.join(map(str, cmd))}\n{tail}")


def train(run_dir: Path, config: dict[str, Any]) -> Path:
    """Train one run (skipped when it finished before); returns its save directory."""
    done = run_dir / "DONE"
    if not done.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {**config, "run_dir": str(run_dir)}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        say(f"train {run_dir.relative_to(ROOT)}")
        start = time.perf_counter()
        run(CLI + ["train", "--config", str(run_dir / "config.yaml")], run_dir / "train.log")
        done.write_text(f"{time.perf_counter() - start:.0f} s\n")
    return run_dir / "checkpoints"


def evaluate(run_dir: Path, heldout: list[str], tasks: str | None = None, limit: int | None = None,
             model: Path | None = None, max_length: int | None = None) -> dict:
    """Held-out bits per byte (and zero-shot tasks) of a run's final checkpoint (or of `model`,
    a Hugging Face directory), cached in RUN_DIR/eval/final.json. `max_length`: the tokens one
    forward pass sees, the same for every arm (default: each checkpoint's training seq_length)."""
    out = run_dir / "eval" / "final.json"
    if out.is_file():
        return json.loads(out.read_text())
    ckpt = model or run_dir / "checkpoints"
    say(f"eval {run_dir.relative_to(ROOT)}")
    result: dict[str, Any] = {}
    ppl = run_dir / "eval" / "final-ppl.json"
    length = ["--max-length", str(max_length)] if max_length else []
    run(CLI + ["eval", "ppl", str(ckpt), "--text", *heldout, "--output", str(ppl)] + length, run_dir / "eval.log")
    result["ppl"] = json.loads(ppl.read_text())
    if tasks:
        mc = run_dir / "eval" / "final-mc.json"
        run(CLI + ["eval", "mc", str(ckpt), "--tasks", tasks, "--output", str(mc)] + length
            + (["--limit", str(limit)] if limit else []), run_dir / "eval-mc.log")
        result["mc"] = json.loads(mc.read_text())
    out.write_text(json.dumps(result, indent=1))
    return result


def heldout_files(limit_bytes: int | None = None) -> tuple[list[str], list[str]]:
    """(the held-out files, all of them or the first ones up to `limit_bytes`; the first ones up
    to CURVE_BYTES, for the curves during training)."""
    files = [str(f) for f in english_docs_corpus(**CORPUS).heldout]
    return _first_bytes(files, limit_bytes), _first_bytes(files, CURVE_BYTES)


def _first_bytes(files: list[str], limit: int | None) -> list[str]:
    chosen, size = [], 0
    for f in files:
        if limit is not None and size >= limit:
            break
        chosen.append(f)
        size += Path(f).stat().st_size
    return chosen


def final_architecture(run_dir: Path) -> Architecture:
    return Architecture.from_json((run_dir / "architecture.json").read_text())


def constraints(prune: dict[str, Any], tp: int = 1) -> Constraints:
    return Constraints(tensor_parallel_size=tp, align=prune["align"],
                       min_heads_per_layer=prune["min_heads_per_layer"],
                       min_query_groups=prune.get("min_query_groups", 1),
                       min_ffn_per_layer=prune["min_ffn_per_layer"], min_hidden=prune["min_hidden"])


def run_arms(factory: ArmFactory, root: Path, arms: list[str], source_steps: int | None,
             heldout: list[str], tasks: str | None = None, limit: int | None = None,
             max_length: int | None = None) -> None:
    """Train and evaluate `arms` in dependency order (B1 needs A's found architecture)."""
    order = [a for a in ("A", *ABLATIONS, "C1", "C2", "B1", "B2", "B3") if a in arms]
    for arm in order:
        if arm == "A" or arm in ABLATIONS:
            config = factory.a(None if arm == "A" else arm)
        elif arm == "C1":
            config = factory.c("fisher")
        elif arm == "C2":
            config = factory.c("activation")
        elif arm == "B1":
            config = factory.b1(final_architecture(root / "A"))
        elif arm == "B2":
            config = factory.b2()
        else:
            config = factory.b3(source_steps or 0)
        train(root / arm, config)
        evaluate(root / arm, heldout, tasks, limit, max_length=max_length)


def scaled(budget: Budget, scale: float) -> Budget:
    """Every step count of the budget times `scale` (a shorter experiment, same shape)."""
    return dataclasses.replace(budget, budget_steps=round(budget.budget_steps * scale),
                               prune_start=round(budget.prune_start * scale), prune_end=round(budget.prune_end * scale),
                               warmup=max(1, round(budget.warmup * scale)))


def tiny(seeds: list[int], ablation_seeds: list[int], arms: list[str], scale: float = 1.0) -> None:
    heldout, curve = heldout_files()
    budget = scaled(TINY_BUDGET, scale)
    source_steps = round(TINY_SOURCE["training"]["train_iters"] * scale)
    for seed in seeds:
        root = ROOT / ("tiny" if scale == 1 else f"tiny-x{scale:g}") / f"seed{seed}"
        source_config = {**TINY_SOURCE, "training": {**TINY_SOURCE["training"], "seed": seed, "train_iters": source_steps,
                                                     "eval_interval": max(1, round(100 * scale)), "eval_text": curve}}
        source_ckpt = train(root / "source", source_config)
        evaluate(root / "source", heldout)
        source = final_architecture(root / "source")
        target = round(TINY_TARGET_RATIO * source.num_parameters())
        data_dir = root / "source" / "data"
        factory = ArmFactory(
            source_config=TINY_SOURCE,  # the arms' model section must equal the source checkpoint's
            start={"checkpoint": {"load": str(source_ckpt), "finetune": True}},
            data={"data_path": [str(data_dir / "train")], "valid_data_path": [str(data_dir / "valid")],
                  "tokenizer_model": str(data_dir / "tokenizer.model")},
            target_params=target,
            uniform=propose_uniform(source, target, constraints(TINY_SOURCE["prune"])),
            budget=budget, data_seed=1000 + seed, eval_text=curve,
        )
        wanted = [a for a in arms if a in MAIN_ARMS or seed in ablation_seeds]
        run_arms(factory, root, wanted, source_steps, heldout)


def smollm2(arms: list[str], limit: int, scale: float = 1.0) -> None:
    from efficientllm.interop.hf_config import read_hf_config
    from efficientllm.interop.smollm2 import smollm2_hf_dir

    heldout, curve = heldout_files(SMOL_HELDOUT_BYTES)
    hf = smollm2_hf_dir()
    root = ROOT / ("smollm2" if scale == 1 else f"smollm2-x{scale:g}") / "seed1"
    budget = scaled(SMOL_BUDGET, scale)
    training = {**SMOL_SOURCE["training"], "eval_interval": max(1, round(SMOL_SOURCE["training"]["eval_interval"] * scale))}
    data_dir = root / "data"
    if not (data_dir / "DONE").is_file():
        say("tokenise the English prose with SmolLM2's tokenizer")
        train_files = [str(f) for f in english_docs_corpus(**CORPUS).train]
        for name, files in (("train", train_files), ("valid", curve)):
            run(CLI + ["preprocess", "--tokenizer", str(hf), "--input", *files, "--output-prefix",
                       str(data_dir / name)], data_dir / f"preprocess-{name}.log")
        (data_dir / "DONE").write_text("ok\n")
    evaluate(root / "source", heldout, PAPER_TASKS, limit, model=hf, max_length=SMOL_EVAL_LENGTH)
    source = read_hf_config(hf).arch
    goal = source.params_keeping_non_embedding(SMOL_KEEP_NON_EMBEDDING)
    # At align 64 SmolLM2's uniform shapes lie ~8% apart (a hidden unit carries 64 embedding
    # columns): every arm is pruned to the size of the uniform shape closest to the goal.
    uniform = propose_uniform(source, goal, constraints(SMOL_SOURCE["prune"]))
    factory = ArmFactory(
        source_config={**SMOL_SOURCE, "training": training, "model": model_shape_fields(source)},
        start={"model": {"from_hf": str(hf)}},
        data={"data_path": [str(data_dir / "train")], "valid_data_path": [str(data_dir / "valid")],
              "tokenizer_model": str(hf)},
        target_params=uniform.num_parameters(),
        uniform=uniform,
        budget=budget, data_seed=1001, eval_text=curve,
    )
    run_arms(factory, root, arms, None, heldout, PAPER_TASKS, limit, SMOL_EVAL_LENGTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("tiny", "smollm2", "figures"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[1])
    parser.add_argument("--arms", help="comma-separated arms (default: all of the source's)")
    parser.add_argument("--limit", type=int, default=100, help="items per zero-shot task (smollm2)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="every step count times this (runs under runs/quality/<source>-x<scale>/)")
    args = parser.parse_args()
    if args.what == "tiny":
        tiny(args.seeds, args.ablation_seeds, (args.arms or ",".join((*MAIN_ARMS, *ABLATIONS))).split(","), args.scale)
    elif args.what == "smollm2":
        smollm2((args.arms or "A,C1,C2").split(","), args.limit, args.scale)
    else:
        from bench.quality.figures import main as figures

        figures(ROOT, REPO / "docs" / "results")


if __name__ == "__main__":
    main()

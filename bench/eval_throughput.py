"""Zero-shot evaluation throughput: our `eval mc` vs lm-eval on the same model and items, one run.

The model is the shipped default architecture (6.8 M parameters, 4096-piece tokenizer) after
one training step, as our checkpoint and as its Hugging Face export. Three evaluators score the
same first N items of ARC-Easy and HellaSwag with batches of the same size:

  ours (megatron)      our megatron-core model on the checkpoint (what `eval mc CKPT` runs)
  ours (transformers)  our Hugging Face backend on the export (what `eval mc HF_DIR` runs)
  lm-eval              lm-evaluation-harness 0.4.13's HFLM on the export (`eval lm-eval`)

Each is timed from a loaded model to the scores (reading the task data, building and tokenising
the requests, the forward passes); the best of `--rounds` rounds counts, rounds interleaved so
machine noise hits all alike (lm-eval keeps its datasets cache across rounds, as a user's would). The token count is what the model reads (the same requests for
all three). Goal: ours / lm-eval >= 1.0 in items/s. Also checked: the same acc and acc_norm.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_throughput.py [--limit 100 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("arc_easy", "hellaswag")
REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(root: Path) -> Path:
    """One step of the default job's model on 1 MB of the default corpus: a real checkpoint."""
    overrides = [f"run_dir={root / 'run'}", "training.train_iters=1", "training.lr_warmup_iters=0",
                 "training.eval_interval=0", "prune.enabled=false", "data.corpus_max_bytes=1000000",
                 "training.tensorboard=false"]
    done = subprocess.run([sys.executable, "-m", "efficientllm", "train", *(f"--set={o}" for o in overrides)],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training the bench model failed:\n{done.stderr[-2000:]}")
    return root / "run" / "checkpoints"


def time_ours(lm, limit: int) -> dict:
    from efficientllm.evaluation.multiple_choice import evaluate_task
    from efficientllm.evaluation.tasks import load_task

    start = time.perf_counter()
    results = [evaluate_task(lm, load_task(name, limit)) for name in TASKS]
    return {"seconds": time.perf_counter() - start, "tokens": sum(r.tokens for r in results),
            "scores": {r.task: (r.acc, r.acc_norm) for r in results}}


def time_lm_eval(hf_dir: Path, limit: int, max_length: int, batch_size: int, cache: Path) -> dict:
    from efficientllm.evaluation.lm_eval_runner import run_lm_eval
    from efficientllm.evaluation.tasks import load_task

    raw = run_lm_eval(hf_dir, [load_task(name) for name in TASKS], limit=limit, max_length=max_length,
                      batch_size=batch_size, datasets_cache=cache)
    return {"seconds": raw["seconds"], "scores": {t: (r["acc"], r["acc_norm"]) for t, r in raw["tasks"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from efficientllm import distributed
    from efficientllm.evaluation.hf_lm import HFCausalLM
    from efficientllm.evaluation.megatron_lm import MegatronLM
    from efficientllm.interop.hf_export import export_hf

    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        hf_dir = export_hf(checkpoint, Path(tmp) / "hf")
        distributed.initialize(distributed.read_launch_env(), 1, 1, None, seed=0)
        megatron = MegatronLM.from_checkpoint(checkpoint, max_length=args.max_length, batch_size=args.batch_size)
        transformers = HFCausalLM(hf_dir, max_length=args.max_length, batch_size=args.batch_size)
        rounds: dict[str, list[dict]] = {"ours (megatron)": [], "ours (transformers)": [], "lm-eval": []}
        for _ in range(args.rounds):
            rounds["ours (megatron)"].append(time_ours(megatron, args.limit))
            rounds["ours (transformers)"].append(time_ours(transformers, args.limit))
            rounds["lm-eval"].append(time_lm_eval(hf_dir, args.limit, args.max_length, args.batch_size,
                                                  Path(tmp) / "datasets_cache"))
        distributed.shutdown()

    items = args.limit * len(TASKS)
    tokens = rounds["ours (megatron)"][0]["tokens"]
    best = {name: min(r["seconds"] for r in runs) for name, runs in rounds.items()}
    reference = rounds["lm-eval"][0]["scores"]
    print(f"{items} items ({args.limit} each of {', '.join(TASKS)}), {tokens:,} input tokens, batch "
          f"{args.batch_size}, max_length {args.max_length}, best of {args.rounds} rounds")
    print(f"{'evaluator':<21} {'seconds':>8} {'items/s':>9} {'tokens/s':>10} {'vs lm-eval':>11}  same acc/acc_norm")
    for name, seconds in best.items():
        same = all(r["scores"] == reference for r in rounds[name])
        print(f"{name:<21} {seconds:>8.2f} {items / seconds:>9.1f} {tokens / seconds:>10.0f} "
              f"{best['lm-eval'] / seconds:>10.2f}x  {'yes' if same else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"items": items, "tokens": tokens, "seconds": best}, indent=1))


if __name__ == "__main__":
    main()

"""What the pruned model buys at inference (issue 13): SmolLM2-135M against itself pruned under
pruning-aware pretraining at `prune.align` 8, 64 and 128, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/inference/inference.py [--aligns 8 64 128] [--threads 1]
        [--repeats 5] [--prepare-only]

1. The source: SmolLM2-135M (`efficientllm import hf`). Each pruned model: `efficientllm train`
   from it (model.from_hf) on English prose tokenised with SmolLM2's tokenizer, pruned at steps
   2-8 to 65% of the source's non-embedding parameters with `prune.align` a. Every model is
   exported the user's way: `efficientllm export hf` and `export gguf` at f32 and q8_0.
2. Quality: held-out bits per byte (`efficientllm eval ppl`, 2048-token windows) on the first
   40 kB of held-out files.
3. Speed, every model in each backend, interleaved: batch-1 decode tokens/s (31 steps after a
   32-token prompt) and batch-8 prefill tokens/s (8 x 128 tokens): (a) our megatron forward,
   (b) the HF export in transformers (fp32, CPU), (c) the GGUF in llama.cpp, f32 and q8_0.
4. Against the limits (limits.py): speedup / limit ratio, the goal being >= 0.9 in (b) and (c).

Runs live under runs/inference/ (each step is skipped when already done); the table is printed
and written to docs/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.inference.limits import decode_weights_read, prefill_flops, speedup_limits  # noqa: E402
from bench.inference.speed import (  # noqa: E402
    Workload,
    llamacpp_timings,
    megatron_timings,
    transformers_timings,
)
from efficientllm.architecture import Architecture  # noqa: E402

CLI = [sys.executable, "-m", "efficientllm"]
ROOT = REPO / "runs" / "inference"
OUT = REPO / "docs" / "results" / "inference.json"
KEEP_NON_EMBEDDING = 0.65
TRAIN_FILES, HELDOUT_BYTES = 40, 40_000
EVAL_LENGTH = 2048  # every model scored with the same windows (a checkpoint's own default is its seq_length)
PROMPT, NEW_TOKENS, PREFILL_BATCH, PREFILL_LENGTH = 32, 32, 8, 128
GGUF_DTYPES = ("f32", "q8_0")


def say(text: str) -> None:
    print(f"[inference {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(cmd: list[Any], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"command failed ({code}): {' '.join(map(str, cmd))}\n{tail}")


def once(marker: Path, what: str, step) -> None:
    """Run `step` unless `marker` says it finished before."""
    if not marker.is_file():
        say(what)
        step()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("ok\n")


def text_files() -> tuple[list[str], list[str]]:
    """(training files, held-out files up to HELDOUT_BYTES) of the English prose corpus."""
    from efficientllm.data.corpus import english_docs_corpus

    split = english_docs_corpus(heldout_fraction=0.05, max_bytes=8_000_000)
    heldout, size = [], 0
    for f in split.heldout:
        if size >= HELDOUT_BYTES:
            break
        heldout.append(str(f))
        size += f.stat().st_size
    return [str(f) for f in split.train[:TRAIN_FILES]], heldout


def pruned_config(hf: Path, data: Path, align: int, target_params: int, run_dir: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "model": {"from_hf": str(hf)},
        "data": {"data_path": [str(data / "train")], "valid_data_path": [str(data / "valid")],
                 "tokenizer_model": str(hf), "seq_length": PREFILL_LENGTH},
        "training": {"micro_batch_size": 1, "global_batch_size": 4, "train_iters": 12, "lr": 3e-5, "min_lr": 3e-6,
                     "lr_warmup_iters": 2, "log_interval": 1, "eval_interval": 12, "eval_iters": 2,
                     "tensorboard": False},
        "checkpoint": {"save_interval": None, "keep_last": 1},
        "prune": {"enabled": True, "target_params": target_params, "target_ratio": None, "start_step": 2,
                  "end_step": 8, "interval": 2, "align": align, "min_heads_per_layer": 3, "min_query_groups": 1,
                  "min_ffn_per_layer": 256, "min_hidden": 256},
        "saliency": {"hessian_window": 2},
    }


def export(checkpoints: Path, out: Path) -> dict[str, str]:
    """HF and GGUF exports of a checkpoint; a dtype the widths cannot take is recorded (in
    model-<dtype>.refused), not fatal. Returns {dtype: why} of the refused ones."""
    once(out / "hf.DONE", f"export hf {out.parent.name}", lambda: run(CLI + ["export", "hf", checkpoints, out / "hf"],
                                                                   out / "export-hf.log"))
    for dtype in GGUF_DTYPES:
        gguf, why = out / f"model-{dtype}.gguf", out / f"model-{dtype}.refused"
        if gguf.is_file() or why.is_file():
            continue
        log = out / f"export-{dtype}.log"
        try:
            run(CLI + ["export", "gguf", checkpoints, gguf, "--dtype", dtype], log)
        except SystemExit:
            why.write_text(log.read_text().strip().splitlines()[-1] + "\n")
    return {dtype: (out / f"model-{dtype}.refused").read_text().strip() for dtype in GGUF_DTYPES
            if (out / f"model-{dtype}.refused").is_file()}


def architecture(checkpoints: Path) -> Architecture:
    from efficientllm.training import checkpoint

    meta = checkpoint.verify(checkpoint.find_checkpoint(checkpoints))
    return Architecture.from_dict(meta["architecture"])


def bits_per_byte(checkpoints: Path, heldout: list[str], out: Path) -> float:
    result = out / "ppl.json"
    once(out / "ppl.DONE", f"eval ppl {out.parent.name}", lambda: run(
        CLI + ["eval", "ppl", checkpoints, "--text", *heldout, "--output", result, "--max-length", EVAL_LENGTH],
        out / "eval.log"))
    return json.loads(result.read_text())["perplexity"]["bits_per_byte"]


def workload(hf: Path, heldout: list[str], repeats: int) -> Workload:
    """A decode prompt and a prefill batch of real held-out text in SmolLM2's tokenizer."""
    from efficientllm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf)
    ids: list[int] = []
    for f in heldout:
        ids += tokenizer.tokenize(Path(f).read_text())
        if len(ids) >= PROMPT + PREFILL_BATCH * PREFILL_LENGTH:
            break
    rows = [ids[PROMPT + i * PREFILL_LENGTH:PROMPT + (i + 1) * PREFILL_LENGTH] for i in range(PREFILL_BATCH)]
    return Workload(ids[:PROMPT], NEW_TOKENS, rows, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligns", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--threads", type=int, default=1, help="threads of every backend")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prepare-only", action="store_true",
                        help="prune, export and evaluate, but time nothing (timings want a quiet machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CLI steps below

    from efficientllm.interop.smollm2 import smollm2_hf_dir

    hf = smollm2_hf_dir()
    train_files, heldout = text_files()
    data = ROOT / "data"
    once(data / "DONE", "tokenise English prose with SmolLM2's tokenizer", lambda: [
        run(CLI + ["preprocess", "--tokenizer", hf, "--input", *files, "--output-prefix", data / name],
            data / f"preprocess-{name}.log") for name, files in (("train", train_files), ("valid", heldout))])

    models: dict[str, Path] = {"source": ROOT / "source"}
    once(ROOT / "source" / "import.DONE", "import SmolLM2-135M",
         lambda: run(CLI + ["import", "hf", hf, ROOT / "source" / "checkpoints"], ROOT / "source" / "import.log"))
    source = architecture(ROOT / "source" / "checkpoints")
    target = source.params_keeping_non_embedding(KEEP_NON_EMBEDDING)
    for align in args.aligns:
        run_dir = ROOT / f"align{align}"
        config = pruned_config(hf, data, align, target, run_dir)

        def train(run_dir: Path = run_dir, config: dict[str, Any] = config) -> None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            run(CLI + ["train", "--config", run_dir / "config.yaml"], run_dir / "train.log")

        once(run_dir / "train.DONE", f"prune SmolLM2 at align {align}", train)
        models[f"align {align}"] = run_dir

    record: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "repeats": args.repeats,
                              "target_params": target, "models": {}}
    for name, where in models.items():
        ckpt = where / "checkpoints"
        arch = architecture(ckpt)
        record["models"][name] = {
            "params": arch.num_parameters(), "hidden_size": arch.hidden_size,
            "ffn": [l.ffn_hidden_size for l in arch.layers], "heads": [l.num_attention_heads for l in arch.layers],
            "decode_weights": decode_weights_read(arch), "prefill_flops": prefill_flops(arch, PREFILL_LENGTH),
            "limits": speedup_limits(source, arch, PREFILL_LENGTH),
            "gguf_refused": export(ckpt, where / "export"),
            "bits_per_byte": bits_per_byte(ckpt, heldout, where / "eval"),
        }

    if args.prepare_only:
        return
    work = workload(hf, heldout, args.repeats)
    for backend, timed in backend_timings(models, work, args.threads):
        say(f"timed {backend}")
        for name, timing in timed.items():
            record["models"][name].setdefault("speed", {})[backend] = {
                **timing.rates(work), "decode_s": timing.decode_s, "prefill_s": timing.prefill_s}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1))
    print(table(record))


def backend_timings(models: dict[str, Path], work: Workload, threads: int):
    """(backend, {model: Timing}) for each backend in turn; a GGUF dtype a model was refused in is
    timed for the others."""
    names = list(models)
    yield "megatron", dict(zip(names, megatron_timings([models[n] / "checkpoints" for n in names], work)))
    yield "transformers", dict(zip(names, transformers_timings([models[n] / "export" / "hf" for n in names], work)))
    for dtype in GGUF_DTYPES:
        files = {n: models[n] / "export" / f"model-{dtype}.gguf" for n in names}
        usable = [n for n in names if files[n].is_file()]
        yield f"llama.cpp {dtype}", dict(zip(usable, llamacpp_timings([files[n] for n in usable], work, threads)))


def table(record: dict[str, Any]) -> str:
    """Markdown: per pruned model and backend, speedup over the source and speedup / limit."""
    models = record["models"]
    source = models["source"]
    lines = ["| model | params | bits/byte | backend | decode tok/s | x source | / limit | "
             "prefill tok/s | x source | / limit |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in models.items():
        for backend, speed in m.get("speed", {}).items():
            base = source["speed"].get(backend)
            cells = [name, f"{m['params']:,}", f"{m['bits_per_byte']:.4f}", backend]
            for phase in ("decode", "prefill"):
                cells.append(f"{speed[phase]:.1f}")
                if name == "source" or base is None:
                    cells += ["", ""]
                else:
                    ratio = speed[phase] / base[phase]
                    cells += [f"{ratio:.2f}", f"{ratio / m['limits'][phase]:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    limits = [f"{n}: decode {m['limits']['decode']:.2f}, prefill {m['limits']['prefill']:.2f}"
              for n, m in models.items() if n != "source"]
    return "\n".join(lines) + "\n\nLimits (weight bytes / FLOPs ratios): " + "; ".join(limits)


if __name__ == "__main__":
    main()

"""Hugging Face import and export of SmolLM2-135M: wall time against transformers loading and
saving the same model, and each rank's peak memory at TP1 and TP2 against the model's size, all
measured side by side in one run.

Import (`import_hf`: check, build, read this rank's slices, save torch_dist shards) runs on real
ranks started by torchrun (at TP2 with SmolLM2's 3 KV heads padded to 4, exact); each rank reports its peak RSS above what the process held once its
libraries were imported, so the figure is what the model costs, not the interpreter. Export
(`export_hf` of the TP1 import) runs in this process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/interop_io.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(hf_dir: str, out: str, tp: int, report: str) -> None:
    """One rank of a TP-way import, reporting its time and memory."""
    import psutil

    from efficientllm import distributed
    from efficientllm.interop.hf_import import plan_import, write_checkpoint

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    plan = plan_import(hf_dir, tp, 1, pad_to_tp=True)  # SmolLM2's 3 KV heads: one zero group at TP2
    distributed.initialize(distributed.read_launch_env(), tp, 1, None, plan.config.training.seed)
    try:
        write_checkpoint(plan, Path(out))
    finally:
        distributed.shutdown()
    record = {"seconds": time.perf_counter() - start, "peak_above_baseline": _peak_rss_bytes() - baseline}
    Path(f"{report}.rank{os.environ['RANK']}.json").write_text(json.dumps(record))


def run_import(hf_dir: Path, root: Path, tp: int) -> dict:
    report = root / f"tp{tp}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", __file__,
           "--worker", str(hf_dir), str(root / f"ckpt_tp{tp}"), str(tp), str(report)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"import at TP{tp} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(tp)]
    return {"wall": wall, "seconds": max(r["seconds"] for r in ranks),
            "peak_per_rank": max(r["peak_above_baseline"] for r in ranks), "checkpoint": root / f"ckpt_tp{tp}"}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from efficientllm.interop.export_source import load_export_source  # noqa: F401 (imports megatron before timing)
    from efficientllm.interop.hf_export import export_hf
    from efficientllm.interop.smollm2 import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    root = Path(tempfile.mkdtemp(prefix="interop_io_"))
    try:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        hf_load = time.perf_counter() - start
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        start = time.perf_counter()
        model.save_pretrained(str(root / "saved_by_transformers"))
        hf_save = time.perf_counter() - start
        del model

        imports = {tp: run_import(hf_dir, root, tp) for tp in (1, 2)}
        start = time.perf_counter()
        export_hf(imports[1]["checkpoint"] / "iter_0000000", root / "exported")
        export = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"SmolLM2-135M: {model_bytes / 2**20:.0f} MiB of fp32 weights; transformers loads it in {hf_load:.1f} s, "
          f"saves it in {hf_save:.1f} s")
    for tp, r in imports.items():
        print(f"import hf at TP{tp}: {r['seconds']:.1f} s in the ranks = {r['seconds'] / hf_load:.1f}x transformers' load "
              f"({r['wall']:.1f} s with process start); peak memory per rank {r['peak_per_rank'] / 2**20:.0f} MiB "
              f"= {r['peak_per_rank'] / model_bytes:.2f}x the model")
    print(f"peak memory per rank TP2 / TP1: {imports[2]['peak_per_rank'] / imports[1]['peak_per_rank']:.2f} "
          f"(0.5 would be a perfect split)")
    print(f"export hf (of the TP1 checkpoint): {export:.1f} s = {export / hf_save:.1f}x transformers' save")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("HF_DIR", "OUT", "TP", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        hf, out, tp, report = args.worker
        worker(hf, out, int(tp), report)
    else:
        main()

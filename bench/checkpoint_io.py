"""Checkpoint save and load time against one training step, and checkpoint size against the
parameter count, measured side by side on one rank at the default model size.

The step is the real one (pipeline schedule fwd/bwd, optimizer step) on synthetic token batches
of the default shape (micro-batch 4, global batch 8, sequence 256); the save and load are the
real `torch_dist` checkpoint (model + Adam state + metadata, atomic rename, manifest).

    OMP_NUM_THREADS=2 .venv/bin/python bench/checkpoint_io.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from efficientllm import distributed
from efficientllm.architecture import architecture_from_config
from efficientllm.config import load_config
from efficientllm.training import checkpoint
from efficientllm.training.trainer import Trainer


def synthetic_batches(vocab: int, micro_batch: int, seq: int):
    generator = torch.Generator().manual_seed(0)
    while True:
        tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=generator)
        yield {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(micro_batch, seq),
            "position_ids": torch.arange(seq).expand(micro_batch, seq),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
    config = load_config(None, [f"run_dir={root / 'run'}", f"checkpoint.save={root / 'ckpt'}", "model.vocab_size=4096"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = distributed.LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")
    distributed.initialize(launch, 1, 1, None, seed=config.training.seed)
    trainer = Trainer(config, launch)
    trainer.dp_rank, trainer.dp_size = 0, 1
    t = config.training
    trainer.num_microbatches = t.global_batch_size // t.micro_batch_size
    trainer.build_model(architecture_from_config(config, 4096))
    batches = synthetic_batches(4096, t.micro_batch_size, config.data.seq_length)
    trainer.train_step(batches)  # warm-up: allocates Adam state

    steps, saves, loads = [], [], []
    try:
        for _ in range(args.rounds):
            start = time.perf_counter()
            trainer.train_step(batches)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            path = checkpoint.save(trainer, trainer.save_dir)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.load(trainer, checkpoint.find_checkpoint(trainer.save_dir))
            loads.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        params = trainer.arch.num_parameters()
        step, save, load = (statistics.median(x) for x in (steps, saves, loads))
        print(f"model: {params:,} parameters (default config), fp32, Adam, TP1 PP1, one rank")
        print(f"train step   {step * 1000:8.1f} ms")
        print(f"save         {save * 1000:8.1f} ms  = {save / step:.2f} x step")
        print(f"load         {load * 1000:8.1f} ms  = {load / step:.2f} x step")
        print(f"size         {size / 2**20:8.2f} MiB = {size / params:.2f} bytes/parameter "
              f"(fp32 weights + Adam moments = 12)")
    finally:
        distributed.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

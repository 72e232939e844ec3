"""Tokens/s of our training loop vs. a bare megatron-core loop, same model and batches, one run.

The bare loop is what a user would write by hand with megatron-core alone (DDP, optimizer,
pipeline schedule, optimizer step); ours adds the sampler, logging and bookkeeping. Rounds are
interleaved so machine noise hits both alike. Goal: ours/bare >= 0.95.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_throughput.py [--steps 10 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from efficientllm.config import load_config
from efficientllm.training.trainer import Trainer, _forward_step


def bare_megatron_steps(trainer: Trainer, batches: list[dict], steps: int) -> float:
    """Seconds for `steps` steps of the plain megatron-core recipe on the trainer's model."""
    model, optimizer = trainer.model[0], trainer.optimizer
    c = trainer.config
    start = time.perf_counter()
    for step in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=trainer.num_microbatches, seq_length=c.data.seq_length,
            micro_batch_size=c.training.micro_batch_size, forward_only=False,
        )
        optimizer.step()
    return time.perf_counter() - start


def ours_steps(trainer: Trainer, steps: int) -> float:
    iterator = trainer._iterators(trainer.data.train, trainer.state.consumed_samples)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(iterator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = load_config(None, ["run_dir=runs/bench", "training.tensorboard=false", "training.train_iters=1000",
                                 "prune.enabled=false"])
    trainer = Trainer(config)
    trainer.setup()
    try:
        batches = [next(trainer._iterators(trainer.data.train, 0)) for _ in range(trainer.num_microbatches)]
        tokens = args.steps * config.training.global_batch_size * config.data.seq_length
        ours = bare = 0.0
        ours_steps(trainer, 2)  # warm-up
        bare_megatron_steps(trainer, batches, 2)
        for _ in range(args.rounds):
            ours += ours_steps(trainer, args.steps)
            bare += sum(bare_megatron_steps(trainer, batches, 1) for _ in range(args.steps))
        n = args.rounds
        print(f"model: {trainer.arch.num_parameters():,} params, {torch.get_num_threads()} threads")
        print(f"ours: {n * tokens / ours:,.0f} tokens/s | bare megatron-core: {n * tokens / bare:,.0f} tokens/s"
              f" | ratio ours/bare: {bare / ours:.3f} (goal >= 0.95)")
    finally:
        trainer.close()


if __name__ == "__main__":
    main()

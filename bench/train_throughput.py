"""Tokens/s of our training loop vs. a bare megatron-core loop, same model and batches, one run.

The bare loop is what a user would write by hand with megatron-core alone (DDP, optimizer,
pipeline schedule, optimizer step); ours adds the sampler, logging and bookkeeping. Rounds are
interleaved so machine noise hits both alike. Goal: ours/bare >= 0.95. On a GPU each loop's
model FLOPs utilisation (MFU) is printed too, against the GPU's dense bf16 peak.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_throughput.py [--steps 10 --rounds 3]
    python bench/train_throughput.py --set training.bf16=true --set model.hidden_size=960 ... --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from efficientllm.architecture import Architecture
from efficientllm.config import load_config
from efficientllm.training.trainer import Trainer, _forward_step

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of the GPUs this is meant for.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def _sync() -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_flops_per_token(arch: Architecture, seq_length: int) -> float:
    """Model FLOPs of one trained token (forward + backward = 3x forward), as in the PaLM MFU
    definition: 6 per weight of every matrix multiply (the embedding lookup is none) plus
    12 x layers x attention width x sequence length for the attention scores and values."""
    matmul_weights = arch.hidden_size * arch.vocab_size  # the output layer
    attention_width = 0
    for layer in arch.layers:
        q = layer.num_attention_heads * arch.head_dim
        kv = 2 * layer.num_query_groups * arch.head_dim
        matmul_weights += arch.hidden_size * (q + kv) + q * arch.hidden_size
        matmul_weights += 3 * arch.hidden_size * layer.ffn_hidden_size  # SwiGLU: gate, up, down
        attention_width += q
    return 6.0 * matmul_weights + 12.0 * attention_width * seq_length


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def bare_megatron_steps(trainer: Trainer, batches: list[dict], steps: int) -> float:
    """Seconds for `steps` steps of the plain megatron-core recipe on the trainer's model."""
    model, optimizer = trainer.model[0], trainer.optimizer
    c = trainer.config
    _sync()
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
    _sync()
    return time.perf_counter() - start


def ours_steps(trainer: Trainer, iterator, steps: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(iterator)
    _sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    config = load_config(None, ["run_dir=runs/bench", "training.tensorboard=false", "training.train_iters=1000",
                                "prune.enabled=false", *args.set])
    trainer = Trainer(config)
    trainer.setup()
    try:
        batches = [next(trainer._iterators(trainer.data.train, 0)) for _ in range(trainer.num_microbatches)]
        iterator = trainer._iterators(trainer.data.train, trainer.state.consumed_samples)
        tokens = args.steps * config.training.global_batch_size * config.data.seq_length
        ours = bare = 0.0
        ours_steps(trainer, iterator, 2)  # warm-up
        bare_megatron_steps(trainer, batches, 2)
        for _ in range(args.rounds):
            ours += ours_steps(trainer, iterator, args.steps)
            bare += sum(bare_megatron_steps(trainer, batches, 1) for _ in range(args.steps))
        n = args.rounds
        result = {
            "params": trainer.arch.num_parameters(),
            "dtype": str(next(trainer.model[0].parameters()).dtype),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "ours_tokens_per_s": n * tokens / ours,
            "bare_tokens_per_s": n * tokens / bare,
            "ratio": bare / ours,
        }
        peak = peak_tflops()
        flops = train_flops_per_token(trainer.arch, config.data.seq_length)
        line = (f"ours: {result['ours_tokens_per_s']:,.0f} tokens/s | bare megatron-core: "
                f"{result['bare_tokens_per_s']:,.0f} tokens/s | ratio ours/bare: {result['ratio']:.3f} (goal >= 0.95)")
        if peak is not None:
            result.update(peak_tflops=peak, ours_mfu=result["ours_tokens_per_s"] * flops / (peak * 1e12),
                          bare_mfu=result["bare_tokens_per_s"] * flops / (peak * 1e12),
                          peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
            line += (f" | MFU ours {result['ours_mfu']:.1%}, bare {result['bare_mfu']:.1%} "
                     f"(of {peak:.0f} TFLOP/s bf16) | peak memory {result['peak_memory_gib']:.1f} GiB")
        print(f"model: {result['params']:,} params, {result['dtype']}, {result['device']}, "
              f"{torch.get_num_threads()} threads")
        print(line)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()

"""Cost of the saliency accumulators and of the Hessian window, measured side by side.

One process, one rank, the same model and batches; rounds interleave the three modes so that
machine noise hits them alike:
- off:     the plain step (zero grads, pipeline schedule fwd/bwd, optimizer step);
- on:      the same with `SaliencyAccumulator.update()` before the optimizer step (goal <= 1.05x);
- window:  on, plus the Hessian forward hooks of an open window (only before a pruning event).
Memory: the accumulators' and Hessians' own bytes, and the process RSS after each mode.

    OMP_NUM_THREADS=2 .venv/bin/python bench/saliency_overhead.py [--steps 5 --rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import psutil
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from efficientllm import distributed
from efficientllm.architecture import Architecture
from efficientllm.config import ParallelConfig, SaliencyConfig, TrainingConfig
from efficientllm.model import ModelOptions, build_model_chunks
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.saliency import SaliencyAccumulator
from efficientllm.training.optimizer import build_optimizer, wrap_ddp
from efficientllm.training.trainer import _forward_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--micro", type=int, default=2)
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    distributed.initialize(distributed.LaunchEnv(0, 1, 0, "127.0.0.1", port, "single"), 1, 1, None, seed=1234)
    arch = Architecture.uniform(hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=8,
                                num_query_groups=4, ffn_hidden_size=int(2.75 * args.hidden), vocab_size=4096)
    model = wrap_ddp(build_model_chunks(arch, ModelOptions(seq_length=args.seq)), ParallelConfig())
    optimizer, _ = build_optimizer(model, TrainingConfig(lr_warmup_iters=0, train_iters=1000), ParallelConfig())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (args.micro, args.mbs, args.seq + 1), generator=g)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": torch.arange(args.seq).expand(args.mbs, -1),
                "loss_mask": torch.ones(args.mbs, args.seq)} for t in tokens]
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True))
    acc.remove()  # attached per mode below
    hessians = HessianCollector(model, arch)

    def step(mode: str) -> None:
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter(batches), model=model[0],
                                    num_microbatches=args.micro, seq_length=args.seq, micro_batch_size=args.mbs,
                                    forward_only=False)
        if mode != "off":
            acc.update()
        optimizer.step()

    def run(mode: str) -> float:
        if mode != "off":
            acc._bind(model, arch)  # registers the layer hooks
        if mode == "window":
            hessians.open_window()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(mode)
        seconds = (time.perf_counter() - start) / args.steps
        acc.remove()
        hessians.close_window()
        return seconds

    process = psutil.Process()
    times = {m: [] for m in ("off", "on", "window")}
    rss = {}
    run("off")  # warm-up
    for _ in range(args.rounds):
        for mode in times:
            times[mode].append(run(mode))
            rss[mode] = max(rss.get(mode, 0), process.memory_info().rss)
    off, on, window = (statistics.median(times[m]) for m in ("off", "on", "window"))
    stat_bytes = sum(t.numel() * t.element_size() for s in acc.stats.values() for t in s.values()) + \
        (acc.hidden_fisher.numel() + acc.hidden_taylor.numel()) * 8
    hess_bytes = sum(h.numel() * h.element_size() for h in hessians.hessians.values())
    params = arch.num_parameters()
    print(f"model: {params:,} parameters, {args.micro}x{args.mbs}x{args.seq} tokens/step, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'mode':<8}{'s/step':>10}{'ratio':>8}{'peak RSS MiB':>14}")
    for mode, t in (("off", off), ("on", on), ("window", window)):
        print(f"{mode:<8}{t:>10.4f}{t / off:>8.3f}{rss[mode] / 2**20:>14.1f}")
    print(f"accumulator state: {stat_bytes / 1024:.1f} KiB ({stat_bytes / (4 * params):.2e} of the fp32 weights)")
    print(f"hessians (window): {hess_bytes / 2**20:.2f} MiB")
    distributed.shutdown()


if __name__ == "__main__":
    main()

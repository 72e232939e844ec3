"""What a pruning event costs beside a training step, at three sizes, two layouts, two optimizers.

Every configuration runs on 2 ranks (torchrun; one core each) with an event every step, as in
the paper: first the pruning-aware run's steps before its phase ("plain": saliency accumulates,
no Hessian window), then steps of the pruning phase, each followed by its event. Per
configuration, the slowest rank's
- event time / plain step time (goal: <= 0.25 at every size, not growing with size), the time
  of building a model of the new shape alone, with and without drawing random weights (the
  part of an event that `build_model_chunks(initialize=False)` saves), and the phase step's
  time (the Hessian window is open before every event);
- peak RSS during the events / during the plain steps;
- bytes this rank handed to torch.distributed collectives per event (and per step), against
  its own parameter shard in fp32 (goal: <= 2x), with the call sites that sent the most.
Collectives are counted by wrapping torch.distributed's functions in this process only (the
payload a rank contributes: the tensor of an all-reduce or broadcast, its input of a gather or
reduce-scatter, its side of a send; nothing over a group of one rank).

    OMP_NUM_THREADS=1 .venv/bin/python bench/pruning_event.py [--sizes 7M 25M 100M]
        [--layouts tp1dp2 tp2dp1] [--optimizers plain distributed] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = {  # ~7M is the default job's model
    "7M": [],
    "25M": ["model.hidden_size=512", "model.ffn_hidden_size=1536", "model.num_attention_heads=16",
            "model.num_query_groups=8"],
    "100M": ["model.hidden_size=768", "model.num_layers=12", "model.ffn_hidden_size=2560",
             "model.num_attention_heads=12", "model.num_query_groups=4"],
}
STEPS = {"7M": (2, 3, 3), "25M": (2, 3, 3), "100M": (1, 2, 2)}  # warm-up, plain steps, events
LAYOUTS = {"tp1dp2": ["parallel.tensor_model_parallel_size=1"], "tp2dp1": ["parallel.tensor_model_parallel_size=2"]}
OPTIMIZERS = {"plain": ["parallel.use_distributed_optimizer=false"],
              "distributed": ["parallel.use_distributed_optimizer=true"]}
# Every run: the default job's data, 1,024 tokens a step; a pruning phase long enough that an
# event removes ~0.25% of the model (the 1.7B example: ~0.01%); the statistics window covers
# the event's own step only, so the plain steps before the phase carry no hooks.
COMMON = ["run_dir=runs/bench_event", "training.micro_batch_size=2", "training.global_batch_size=4",
          "training.tensorboard=false", "training.eval_interval=0", "prune.enabled=true", "prune.target_ratio=0.5",
          "prune.interval=1", "saliency.hessian_window=1", "training.train_iters=200", "prune.end_step=200"]


class CollectiveCounter:
    """Wraps torch.distributed's collectives; adds up their payload bytes and calls under the
    current `label` (None: not counting), by the efficientllm function that called them
    (directly or through megatron)."""

    NAMES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
             "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "gather",
             "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_gather_object",
             "broadcast_object_list")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.label: str | None = None
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()
        for name in self.NAMES:
            setattr(dist, name, self._counted(name, getattr(dist, name)))

    def _counted(self, name: str, original):
        import inspect

        import torch.distributed as dist

        signature = inspect.signature(original)

        def counted(*args, **kwargs):
            group = signature.bind(*args, **kwargs).arguments.get("group")
            # A group of one rank (DP=1, say) sends nothing.
            if self.label is not None and dist.get_world_size(group) > 1:
                key = (self.label, self._site())
                self.bytes[key] += _payload(name, args, kwargs)
                self.calls[key] += 1
            return original(*args, **kwargs)

        return counted

    @staticmethod
    def _site() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if "/efficientllm/" in path:
                return f"{path.split('/efficientllm/', 1)[1]}:{frame.f_code.co_name}"
            frame = frame.f_back
        return "other"

    def total(self, label: str, of: Counter | None = None) -> float:
        return sum(n for (l, _), n in (of or self.bytes).items() if l == label)

    def sites(self, label: str) -> dict[str, int]:
        return {site: n for (l, site), n in self.bytes.most_common() if l == label}


def _payload(name: str, args: tuple, kwargs: dict) -> int:
    import torch

    def size(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return 0

    if name in ("all_gather_object", "broadcast_object_list"):
        obj = args[1] if name == "all_gather_object" else args[0]
        return len(pickle.dumps(obj))
    if name == "batch_isend_irecv":
        return sum(size(op.tensor) for op in args[0] if op.op.__name__ == "isend")
    if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single"):
        return size(args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input")))
    if name in ("recv", "irecv"):
        return 0  # counted on the sending side
    return size(args[0] if args else kwargs.get("tensor"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: str, overrides: list[str], out: Path) -> None:
    """One rank of one configuration (under torchrun); writes its figures to OUT/rank{R}.json."""
    counter = CollectiveCounter()  # before megatron binds any torch.distributed function

    import torch.distributed as dist

    from efficientllm.config import load_config
    from efficientllm.model import build_model_chunks
    from efficientllm.training.trainer import Trainer

    warmup, plain_steps, events = STEPS[size]
    start = warmup + plain_steps + 1
    config = load_config(None, [*COMMON, f"prune.start_step={start}", *MODEL[size], *overrides])
    trainer = Trainer(config)
    trainer.setup()
    try:
        iterator = trainer._iterators(trainer.data.train, 0)
        own_bytes = 4 * sum(p.numel() for chunk in trainer.model for p in chunk.parameters())  # fp32
        removed = 0

        def step(number: int, label: str | None) -> tuple[float, float]:
            """One step of the trainer's loop; (step seconds, event seconds)."""
            nonlocal removed
            trainer.pruning.before_step(number)
            dist.barrier()
            begin = time.perf_counter()
            counter.label = label
            trainer.train_step(iterator)
            counter.label = None
            stepped = time.perf_counter()
            dist.barrier()
            event_start = time.perf_counter()
            counter.label = None if label is None else "event"
            record = trainer.pruning.after_step(number)
            counter.label = None
            dist.barrier()
            if record is not None:
                removed += record["params_before"] - record["params_after"]
            return stepped - begin, time.perf_counter() - event_start

        for s in range(1, warmup + 1):
            step(s, None)
        plain = [step(s, "plain")[0] for s in range(warmup + 1, start)]
        step_peak = _peak_rss_mib()
        phase, event_times = zip(*(step(s, "phase") for s in range(start, start + events)))
        builds = {}
        for initialize in (True, False):  # a new model with and without drawing random weights
            begin = time.perf_counter()
            build_model_chunks(trainer.arch, trainer.options, initialize=initialize)
            builds[initialize] = time.perf_counter() - begin
        median = lambda xs: sorted(xs)[len(xs) // 2]
        result = {
            "params": trainer.arch.num_parameters(),
            "own_bytes": own_bytes,
            "plain_step_s": median(plain),
            "phase_step_s": median(phase),
            "event_s": median(event_times),
            "build_init_s": builds[True],
            "build_empty_s": builds[False],
            "removed_per_event": removed / events,
            "plain_step_bytes": counter.total("plain") / plain_steps,
            "phase_step_bytes": counter.total("phase") / events,
            "event_bytes": counter.total("event") / events,
            "event_calls": counter.total("event", counter.calls) / events,
            "event_sites": {site: n / events for site, n in counter.sites("event").items()},
            "step_peak_mib": step_peak,
            "event_peak_mib": _peak_rss_mib(),
        }
        Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        trainer.close()


def run_configuration(size: str, layout: str, optimizer: str, root: Path) -> dict[str, Any]:
    """Both ranks of one configuration under torchrun; the slowest rank's times, the largest
    per-rank bytes and memory ratio."""
    out = root / f"{size}-{layout}-{optimizer}"
    out.mkdir(parents=True)
    from efficientllm.distributed import free_port

    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), __file__, "--one", size, str(out), *LAYOUTS[layout], *OPTIMIZERS[optimizer]]
    log = out / "log.txt"
    with log.open("w") as f:
        done = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"{out.name} failed (log {log}):\n" + "\n".join(log.read_text().splitlines()[-20:]))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    worst = max(ranks, key=lambda r: r["event_bytes"] / r["own_bytes"])
    return {
        "params": ranks[0]["params"],
        "plain_step_s": max(r["plain_step_s"] for r in ranks),
        "phase_step_s": max(r["phase_step_s"] for r in ranks),
        "event_s": max(r["event_s"] for r in ranks),
        "build_init_s": max(r["build_init_s"] for r in ranks),
        "build_empty_s": max(r["build_empty_s"] for r in ranks),
        "removed_per_event": ranks[0]["removed_per_event"],
        "memory_ratio": max(r["event_peak_mib"] / r["step_peak_mib"] for r in ranks),
        "event_peak_mib": max(r["event_peak_mib"] for r in ranks),
        **{k: worst[k] for k in ("own_bytes", "event_bytes", "event_calls", "phase_step_bytes",
                                 "plain_step_bytes", "event_sites")},
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        size, out, *overrides = sys.argv[2:]
        measure(size, overrides, Path(out))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(MODEL), choices=list(MODEL))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pruning_event_") as tmp:
        for size in args.sizes:
            for layout in args.layouts:
                for optimizer in args.optimizers:
                    r = results[f"{size} {layout} {optimizer}"] = run_configuration(size, layout, optimizer, Path(tmp))
                    top = ", ".join(f"{site} {_mib(n)}" for site, n in list(r["event_sites"].items())[:3])
                    print(f"{size:>4} {layout} {optimizer:<11} {r['params']:>11,} params | plain step "
                          f"{r['plain_step_s']:.3f}s, phase step {r['phase_step_s']:.3f}s | event {r['event_s']:.3f}s "
                          f"= {r['event_s'] / r['plain_step_s']:.2f} steps (goal <= 0.25) | building a model alone: "
                          f"{r['build_init_s']:.3f}s with random init, {r['build_empty_s']:.3f}s without | peak RSS event/step "
                          f"{r['memory_ratio']:.3f} | per rank per event {_mib(r['event_bytes'])} in "
                          f"{r['event_calls']:.0f} calls = {r['event_bytes'] / r['own_bytes']:.2f}x its fp32 shard "
                          f"{_mib(r['own_bytes'])} (goal <= 2) | phase step {_mib(r['phase_step_bytes'])} vs plain "
                          f"{_mib(r['plain_step_bytes'])} | most: {top}", flush=True)
    for layout in args.layouts:
        for optimizer in args.optimizers:
            ratios = [f"{s} {results[f'{s} {layout} {optimizer}']['event_s'] / results[f'{s} {layout} {optimizer}']['plain_step_s']:.2f}"
                      for s in args.sizes]
            print(f"event/step with size, {layout} {optimizer}: " + " -> ".join(ratios))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

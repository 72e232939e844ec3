"""Wall time and memory of one pruning event vs. one training step, at two model sizes.

Goals (issue 4): an event costs <= 2 training steps; peak memory during an event <= 1.2x that
of a step. Each size runs in its own process (megatron keeps global state), single rank.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pruning_event.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

SIZES = {  # the default model, and one with twice the hidden size and FFN width
    "default": [],
    "2x-wide": ["model.hidden_size=512", "model.ffn_hidden_size=1536", "model.num_attention_heads=16",
                "model.num_query_groups=8"],
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(overrides: list[str]) -> dict:
    from efficientllm.config import load_config
    from efficientllm.training.trainer import Trainer

    config = load_config(None, ["run_dir=runs/bench", "training.tensorboard=false", "prune.start_step=400",
                                "prune.end_step=450", *overrides])
    trainer = Trainer(config)
    trainer.setup()
    try:
        iterator = trainer._iterators(trainer.data.train, 0)
        trainer.pruning.hessians.open_window()
        for _ in range(2):  # warm-up, and statistics for the event to use
            trainer.train_step(iterator)
        steps = 3
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(iterator)
        step_s = (time.perf_counter() - start) / steps
        step_peak = _peak_rss_mib()
        arch = trainer.arch
        budget = arch.num_parameters() // 50  # one event of a 50-event schedule
        start = time.perf_counter()
        event = trainer.pruning._event(trainer.state.iteration, arch, budget)
        event_s = time.perf_counter() - start
        return {"params": arch.num_parameters(), "step_s": step_s, "event_s": event_s,
                "removed": event["params_before"] - event["params_after"],
                "step_peak_mib": step_peak, "event_peak_mib": _peak_rss_mib()}
    finally:
        trainer.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2:])))
        return
    results = {}
    for name, overrides in SIZES.items():
        out = subprocess.run([sys.executable, __file__, "--one", *overrides], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        print(f"{name}: {r['params']:,} params | step {r['step_s']:.3f}s | event {r['event_s']:.3f}s "
              f"= {r['event_s'] / r['step_s']:.2f} steps (goal <= 2) | removed {r['removed']:,} params | "
              f"peak RSS event/step {r['event_peak_mib'] / r['step_peak_mib']:.3f} (goal <= 1.2)")
    a, b = results["default"], results["2x-wide"]
    print(f"growth with size: params x{b['params'] / a['params']:.2f} -> event time x{b['event_s'] / a['event_s']:.2f}, "
          f"step time x{b['step_s'] / a['step_s']:.2f}")


if __name__ == "__main__":
    main()

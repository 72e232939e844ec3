"""What the user sees: a progress bar, log lines, metrics.jsonl and TensorBoard, on rank 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    """Every record goes to `metrics.jsonl` (one JSON object a line) and TensorBoard; every
    `log_interval`-th training record is also printed."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._writer = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends; a fresh one in a reused run directory starts the file anew.
        self._jsonl = (run_dir / "metrics.jsonl").open("a" if start_step > 0 else "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def record(self, kind: str, step: int, values: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in _scalars(values):
                self._writer.add_scalar(f"{kind}/{name}", value, step)
        if self._bar is not None and kind == "train":
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}")
        if echo:
            self.print(f"[{kind}] step {step} " + " | ".join(_fmt(k, v) for k, v in values.items()))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._jsonl.close()


def _scalars(values: dict[str, Any]) -> list[tuple[str, float]]:
    """Numbers, and numbers one level down (`ratio/head`), for TensorBoard."""
    out = []
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, value))
        elif isinstance(value, dict):
            out.extend((f"{name}/{k}", v) for k, v in value.items() if isinstance(v, (int, float)))
    return out


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    if isinstance(value, int):
        return f"{name} {value:,}"
    return f"{name} {value}"

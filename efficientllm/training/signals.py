"""Preemption: SIGTERM / SIGUSR1 ask the job to checkpoint at the next step boundary and stop.

The handler only sets a flag; the trainer all-reduces it (with the time limit) once per step, so
every rank stops at the same step even when the signal reached only some of them. A run that
stops before `train_iters` (signal, `exit_interval`, `exit_duration_in_mins`) exits with
EXIT_RESUMABLE after its checkpoint is written, so a wrapper script can requeue it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# EX_TEMPFAIL from sysexits.h: "try again later" — the checkpoint is written, resume the job.
EXIT_RESUMABLE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Installs the handlers (main thread only) and remembers whether a signal came."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

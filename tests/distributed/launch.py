"""Start N real ranks as subprocesses (torchrun's environment contract), with a hard timeout.

Every process started here is killed by PID (its whole process group) when the test ends or the
timeout passes, so a hang fails fast and leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from efficientllm.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


class RanksFailed(AssertionError):
    pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start_ranks(world_size: int, argv: list[str], log_dir: Path, extra_env: dict[str, str] | None = None
                ) -> list[subprocess.Popen]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            **(extra_env or {}),
        }
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed as a whole
            )
        )
    return procs


def wait_ranks(procs: list[subprocess.Popen], log_dir: Path, timeout: float) -> list[RankResult]:
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise RanksFailed(f"ranks still running after {timeout:.0f}s; logs in {log_dir}\n"
                                  + _tail(log_dir, len(procs)))
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2.0)  # let the others report, then stop them
                break
            time.sleep(0.2)
    finally:
        # Kill every rank's whole process group, also after a clean exit: a rank may leave
        # children behind (megatron's checkpoint writer starts a multiprocessing Manager).
        for p in procs:
            _kill_group(p)
    return [
        RankResult(rank, p.returncode, (log_dir / f"rank{rank}.log").read_text())
        for rank, p in enumerate(procs)
    ]


def _tail(log_dir: Path, n: int, lines: int = 15) -> str:
    out = []
    for rank in range(n):
        text = (log_dir / f"rank{rank}.log").read_text().splitlines()[-lines:]
        out.append(f"--- rank {rank} ---\n" + "\n".join(text))
    return "\n".join(out)


def run_ranks(world_size: int, argv: list[str], log_dir: Path, timeout: float = 300,
              extra_env: dict[str, str] | None = None, check: bool = True) -> list[RankResult]:
    """Run `python ARGV` on `world_size` ranks; with check, fail on any non-zero exit."""
    procs = start_ranks(world_size, argv, log_dir, extra_env)
    results = wait_ranks(procs, log_dir, timeout)
    if check and any(r.returncode != 0 for r in results):
        raise RanksFailed(f"a rank failed: {[r.returncode for r in results]}\n" + _tail(log_dir, world_size))
    return results

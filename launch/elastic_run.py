"""`python -m torch.distributed.run`, made preemptible; launch/torchrun.sh runs this.

Two differences from plain torchrun, both for checkpoint-and-requeue on a cluster:

- The agent ignores SIGUSR1 and its workers inherit the ignore until the trainer installs its own
  handler. Under `srun` a forwarded signal reaches every process of the step, so the agent must
  survive it (by default SIGUSR1 terminates a process) and a rank still importing must too.
  Outside SLURM, send SIGUSR1 to the ranks (or to the whole process group), or SIGTERM to the
  agent: it passes SIGTERM on and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30).
- Exit status 75 when a rank exited 75, the trainer's "checkpoint written, requeue me", and every
  other failed rank either did the same or was stopped by the agent. Plain torchrun turns any
  worker failure into 1, which would hide that. The agent stops the other local ranks as soon as
  one exits, so a sibling still tearing down can show up as killed by SIGTERM (or SIGKILL after
  the shutdown timeout); the checkpoint is complete by then, because a rank exits 75 only after
  the collective save (and its final barrier) returned.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

EXIT_CHECKPOINTED = 75
STOPPED_BY_AGENT = {-signal.SIGTERM, -signal.SIGKILL}


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        if EXIT_CHECKPOINTED in codes.values() and set(codes.values()) <= {EXIT_CHECKPOINTED, *STOPPED_BY_AGENT}:
            print(f"elastic_run: checkpoint written, stopping for a resume (rank exit codes {codes})",
                  file=sys.stderr, flush=True)
            return EXIT_CHECKPOINTED
        print(err.format_msg(), file=sys.stderr, flush=True)
        return 1
    except SignalException as err:
        # SIGTERM/SIGINT/...: the agent passed it on to the ranks and waited for them up to
        # TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before killing them.
        print(f"elastic_run: stopped by {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

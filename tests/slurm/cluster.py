"""A real, private, single-host SLURM: munged + slurmctld + slurmd on 127.0.0.1.

Everything lives in one temporary directory (slurm.conf, munge key and socket, state, spool,
pid and log files); clients find it through SLURM_CONF, so nothing under /etc is read or written.
The three daemons are started here and stopped here by PID; job processes that outlive them
(slurmstepd and its tasks carry our SLURM_CONF in their environment) are killed by PID too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from efficientllm.distributed import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd"}
CLIENTS = ["sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun"]
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
}


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here: the tests skip."""


class SlurmStartError(RuntimeError):
    """SLURM is installed but did not come up: the tests fail."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def find_or_install() -> dict[str, str]:
    """Paths of the daemons and clients; apt-installs Debian's packages when missing (as root)."""
    names = list(DAEMONS) + CLIENTS
    missing = [n for n in names if _which(n) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        try:
            if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
                subprocess.run(install, env=env, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
        missing = [n for n in names if _which(n) is None]
    if missing:
        how = "as root, with apt-get" if os.geteuid() == 0 else "(not root, so not installed here)"
        raise SlurmUnavailable(
            f"SLURM is not installed and could not be installed {how}: missing {', '.join(missing)}; "
            f"install the Debian packages {' '.join(PACKAGES)}"
        )
    return {n: _which(n) for n in names}  # type: ignore[misc]


@dataclass
class JobInfo:
    job_id: str
    fields: dict[str, str]

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "")

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", "0"))

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "")


@dataclass
class LocalSlurm:
    root: Path
    bins: dict[str, str]
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment without any outer job's variables, pointed at this cluster."""
        launch_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch_vars}
        return {**env, "SLURM_CONF": str(self.conf)}

    def cancel_all(self, timeout: float = 15) -> None:
        """Cancel every job and wait until the queue is empty."""
        self.run(["scancel", "--user=root"], check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while self.run(["squeue", "-h"], check=False, timeout=10).stdout.strip():
            if time.monotonic() > deadline:
                raise AssertionError("jobs still queued after scancel: " + self.run(["squeue"], check=False).stdout)
            time.sleep(0.2)

    # ----- bring-up --------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge", "log"):
            (r / d).mkdir(mode=0o755, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)  # munged insists: the socket's directory is 755
        key = r / "munge" / "munge.key"  # root-owned, 0400: the packaged key belongs to munge
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "plugstack.conf").write_text("")
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=efficientllm-test",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r / 'munge' / 'munge.sock'},cred_expire=5",
                    f"PlugStackConfig={r / 'plugstack.conf'}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "MpiDefault=none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "ReturnToService=2",
                    "SchedulerParameters=sched_interval=1",
                    "SlurmdParameters=config_overrides",
                    "KillWait=5",
                    "MinJobAge=600",
                    "InactiveLimit=0",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.root / "log" / f"{name}.out").read_text()[-2000:]
                raise SlurmStartError(f"{name} exited with {proc.returncode} at start:\n{tail}")

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        m = self.root / "munge"
        self._start("munged", [
            self.bins["munged"], "-F", "-S", str(m / "munge.sock"), f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}", "--num-threads=2",
        ])
        deadline = time.monotonic() + timeout
        while not (m / "munge.sock").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmStartError("munged did not create its socket")
            time.sleep(0.05)
        self._start("slurmctld", [self.bins["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [self.bins["slurmd"], "-D", "-N", self.host, "-f", str(self.conf)])
        while True:
            self._check_alive()
            state = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
            if state.startswith("idle"):
                return
            if time.monotonic() > deadline:
                raise SlurmStartError(f"node not idle after {timeout:.0f}s (state {state!r}); logs in {self.root / 'log'}")
            time.sleep(0.2)

    # ----- clients ---------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        argv = [self.bins.get(argv[0], argv[0]), *argv[1:]]
        out = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def submit(self, script: str | Path, *args: str, options: list[str] = (), env: dict[str, str] | None = None,
               cwd: Path | None = None) -> str:
        out = self.run(["sbatch", "--parsable", *options, str(script), *args],
                       env={**self.env, **(env or {})}, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> JobInfo:
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return JobInfo(job_id, fields)

    def wait(self, job_id: str, until=lambda job: job.state in TERMINAL_STATES, timeout: float = 120,
             interval: float = 0.2) -> JobInfo:
        """Poll `scontrol show job` every `interval` seconds until `until(job)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job.state} after {timeout:.0f}s: {job.fields}")
            time.sleep(interval)

    # ----- teardown --------------------------------------------------------------------
    def _our_job_pids(self) -> list[int]:
        """Processes that carry our SLURM_CONF but that we did not start: slurmstepd and tasks."""
        marker = f"SLURM_CONF={self.conf}".encode()
        ours = {p.pid for p in self.procs.values()} | {os.getpid()}
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in ours:
                continue
            try:
                environ = Path("/proc", entry, "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 20, remove: bool = True) -> None:
        """Cancel the jobs, stop the daemons by PID, then kill by PID any job process left over."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all(timeout=10)
            except (AssertionError, subprocess.TimeoutExpired):
                pass  # whatever is left is killed by PID below
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # After the daemons: slurmctld's own helper (slurmscriptd) carries our SLURM_CONF too,
        # and killing it under a live slurmctld stalls its shutdown.
        for pid in self._our_job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def start_local_slurm(root: Path | None = None) -> LocalSlurm:
    bins = find_or_install()
    root = Path(root or tempfile.mkdtemp(prefix="efficientllm-slurm-"))
    cluster = LocalSlurm(root, bins)
    try:
        cluster.start()
    except BaseException:
        cluster.stop(remove=False)  # keep the logs the error points to
        raise
    return cluster

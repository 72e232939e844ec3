"""launch/slurm/pretrain.sbatch on a real SLURM (munged + slurmctld + slurmd on this host).

Jobs are tiny (gloo on the CPU, 2 ranks on one node); each test polls `scontrol show job` every
0.2 s and every command has a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launch import REPO
from tests.slurm.cluster import TERMINAL_STATES, LocalSlurm

SBATCH = REPO / "launch/slurm/pretrain.sbatch"
EXIT_CHECKPOINTED = 75


def submit(cluster: LocalSlurm, config: Path | str, *args: str, tmp_path: Path, launcher: str = "torchrun",
           env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Submit the sbatch script for one node with 2 ranks; returns the job id and its output file."""
    output = tmp_path / "slurm-%j.out"
    job = cluster.submit(
        SBATCH, str(config), *args,
        options=["--nodes=1", "--gpus-per-node=0", "--time=5", f"--output={output}"],
        env={"NPROC": "2", "LAUNCHER": launcher, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
             "EFFICIENTLLM_ROOT": str(REPO), **(env or {})},
        cwd=REPO,
    )
    return job, Path(str(output).replace("%j", job))


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def describe(job, output: Path, run_dir: Path | None = None) -> str:
    """What to read when a job did not end as expected."""
    parts = [f"job {job.job_id}: {job.state} exit {job.exit_code} restarts {job.restarts}"]
    files = [output] + (sorted((run_dir / "logs").glob("*")) if run_dir and (run_dir / "logs").is_dir() else [])
    for path in files:
        if path.is_file():
            parts.append(f"--- {path.name} ---\n" + "\n".join(path.read_text().splitlines()[-25:]))
    return "\n".join(parts)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_job_trains_to_completion_and_logs_to_the_run_directory(cluster, tiny_config, tmp_path, launcher):
    """torchrun: one srun task per node running 2 ranks; srun: one task per rank (SLURM_* env)."""
    config = tiny_config(training={"train_iters": 4})
    run_dir = tmp_path / "run"

    job_id, output = submit(cluster, config, tmp_path=tmp_path, launcher=launcher)
    job = cluster.wait(job_id, timeout=90)

    assert job.state == "COMPLETED" and job.exit_code == "0:0", describe(job, output, run_dir)
    assert train_steps(run_dir) == [1, 2, 3, 4]
    job_log = (run_dir / "logs" / f"job-{job_id}.log").read_text()
    assert "layout: world 2 = TP 1 x PP 1 x DP 2" in job_log and "training finished" in job_log
    assert "[train] step 4" in (run_dir / "logs" / f"train-{job_id}.0.log").read_text()


def test_preemption_signal_checkpoints_requeues_and_resumes(cluster, tiny_config, tmp_path):
    """The trainer's contract: SIGUSR1/SIGTERM -> checkpoint at the next step boundary, exit 75."""
    total = 60  # steps of ~50 ms: the signal lands within the first few
    config = tiny_config(training={"train_iters": total})
    run_dir = tmp_path / "run"
    save_dir = run_dir / "checkpoints"
    job_id, output = submit(cluster, config, tmp_path=tmp_path)

    # Once the ranks are training, send what SLURM sends 120 s before the time limit.
    deadline = time.monotonic() + 90
    while not ((run_dir / "metrics.jsonl").exists() and train_steps(run_dir)):
        job = cluster.job(job_id)
        assert job.state not in TERMINAL_STATES, describe(job, output, run_dir)
        assert time.monotonic() < deadline, "no training step after 90 s\n" + describe(job, output, run_dir)
        time.sleep(0.2)
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])

    # The script requeues the job once the ranks exit 75.
    job = cluster.wait(job_id, until=lambda j: j.restarts >= 1 or j.state in TERMINAL_STATES, timeout=90)
    assert job.restarts == 1, "the job was not requeued\n" + describe(job, output, run_dir)
    tracker = save_dir / "latest_checkpointed_iteration.txt"
    checkpointed = int(tracker.read_text().strip())
    assert 0 < checkpointed < total
    assert (save_dir / f"iter_{checkpointed:07d}").is_dir()
    # A requeued job waits for cred_expire (5 s here) before it starts again; start it sooner, but
    # not within the second of the requeue: slurmd compares whole-second times and would refuse
    # the new credential as revoked.
    time.sleep(2)
    cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)

    job = cluster.wait(job_id, timeout=120)
    assert job.state == "COMPLETED" and job.exit_code == "0:0" and job.restarts == 1, describe(job, output, run_dir)
    job_log = (run_dir / "logs" / f"job-{job_id}.log").read_text()
    assert "received SIGUSR1" in job_log
    assert f"job {job_id} restart 1 on" in job_log  # SLURM_RESTART_COUNT reached the script
    assert f"exit {EXIT_CHECKPOINTED}" in job_log
    assert f"resuming from {save_dir} (latest iteration {checkpointed})" in job_log
    assert (run_dir / "logs" / f"train-{job_id}.1.log").is_file()
    # The first run logged steps 1..k, the resumed one k+1..total: resumed, not restarted.
    assert train_steps(run_dir) == list(range(1, total + 1))


# ----- bad input: a clear message and exit 2 before any rank starts -------------------------------
def test_missing_config_file_fails_the_job_before_any_rank_starts(cluster, tmp_path):
    job_id, output = submit(cluster, "configs/no-such-config.yaml", tmp_path=tmp_path)
    job = cluster.wait(job_id, timeout=30)
    assert job.state == "FAILED" and job.exit_code == "2:0", describe(job, output)
    assert "config file 'configs/no-such-config.yaml' does not exist" in output.read_text()


def test_config_asking_for_more_ranks_than_the_world_fails_before_any_rank_starts(cluster, tiny_config, tmp_path):
    config = tiny_config(parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2})
    job_id, output = submit(cluster, config, tmp_path=tmp_path)
    job = cluster.wait(job_id, timeout=30)
    assert job.state == "FAILED" and job.exit_code == "2:0", describe(job, output)
    assert "2x2 = 4 ranks, but the launch has WORLD_SIZE 2" in output.read_text()
    assert not (tmp_path / "run").exists()  # no rank ran, nothing was written


def test_bad_override_fails_before_any_rank_starts(cluster, tiny_config, tmp_path):
    job_id, output = submit(cluster, tiny_config(), "--set", "training.lrr=1", tmp_path=tmp_path)
    job = cluster.wait(job_id, timeout=30)
    assert job.state == "FAILED" and job.exit_code == "2:0", describe(job, output)
    assert "unknown config key 'training.lrr'; did you mean 'lr'?" in output.read_text()


def run_script_directly(cluster: LocalSlurm, tiny_config, **env: str) -> subprocess.CompletedProcess:
    """Run the batch script outside a job, with hand-made SLURM variables."""
    return subprocess.run(
        ["bash", str(SBATCH), str(tiny_config())], cwd=REPO, capture_output=True, text=True, timeout=30,
        env={**cluster.env, "PYTHON": sys.executable, **env},
    )


def test_running_outside_a_job_says_to_use_sbatch(cluster, tiny_config):
    out = run_script_directly(cluster, tiny_config)
    assert out.returncode == 2
    assert "SLURM_JOB_ID is not set: submit this script with sbatch" in out.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SLURM_JOB_NUM_NODES": "2"}, "SLURM_JOB_NODELIST=nodeA names 1 host(s) but SLURM_JOB_NUM_NODES=2"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_ID=7 but SLURM_JOB_NODELIST is not set"),
        ({"SLURM_JOB_NUM_NODES": "two"}, "SLURM_JOB_NUM_NODES='two' is not a positive integer"),
        ({"NPROC": "0"}, "NPROC='0' (ranks per node) is not a positive integer"),
    ],
)
def test_inconsistent_slurm_variables_stop_with_a_clear_message(cluster, tiny_config, env, message):
    base = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "nodeA", "SLURM_JOB_NUM_NODES": "1",
            "SLURM_SUBMIT_DIR": str(REPO)}
    out = run_script_directly(cluster, tiny_config, **{**base, **env})
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr

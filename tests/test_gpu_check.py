"""bench/gpu_check.sh, the one-GPU check, rehearsed end to end on the CPU (gloo, fp32, tiny
sizes): the pruning-aware job stopped inside the pruning phase, resumed, rebuilt after the last
event, inspected, and the throughput loops measured. No GPU is lent to these machines, so the
real run is left to a GPU machine; this keeps it from failing there for a trivial reason."""

from __future__ import annotations

import json
import os
import subprocess

from tests.distributed.launch import REPO


def _gpu_check(out, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench/gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "GPU_CHECK_DIR": str(out), **env})


def test_the_cpu_rehearsal_passes_every_step_of_the_gpu_check(tmp_path):
    result = _gpu_check(tmp_path / "check", GPU_CHECK_CPU_REHEARSAL="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "check/summary.json").read_text())
    assert "failed" not in summary
    job = summary["job"]
    assert job["events"] >= 3 and job["final_params"] < job["source_params"]
    assert job["last_loss"] < job["first_loss"]
    assert summary["throughput"]["ours_tokens_per_s"] > 0 and summary["throughput"]["bare_tokens_per_s"] > 0
    assert "[gpu_check] passed" in result.stdout


def test_without_a_gpu_the_real_check_fails_at_preflight(tmp_path):
    result = _gpu_check(tmp_path / "check", GPU_CHECK_CPU_REHEARSAL="0")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "check/summary.json").read_text())
    assert summary["failed"].startswith("no CUDA device")
    assert not (tmp_path / "check/prune").exists(), "no training step ran"

"""Bad input a new user would try stops `efficientllm train` with one line naming the field and
what is valid, exit code 2, before any work."""

from __future__ import annotations

import subprocess
import sys

from tests.distributed.launch import REPO


def test_bad_fields_and_an_unwritable_run_dir_are_one_line_errors(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cases = {
        "training.lr=-0.001": "training.lr must be in (0, inf), got -0.001",
        "data.split=a,b": "data.split 'a,b' is not valid; give up to 3 non-negative",
        "model.layers=[{num_attention_heads: 4, num_query_groups: 2}]":
            "model.layers[0] needs exactly num_attention_heads, num_query_groups, ffn_hidden_size: missing ffn_hidden_size",
        "saliency.hessian_window=0": "saliency.hessian_window 0 collects no Hessians, so prune.compensation=obs",
        "prune.max_ratio={ffn: 1.5}": "prune.max_ratio.ffn must be in [0, 1], got 1.5",
        f"run_dir={not_a_dir / 'run'}": f"run_dir '{not_a_dir / 'run'}' is not writable: Not a directory",
    }
    runs = {
        override: subprocess.Popen(
            [sys.executable, "-m", "efficientllm", "train", f"--set={override}"], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for override in cases
    }
    try:
        for override, expected in cases.items():
            _, err = runs[override].communicate(timeout=600)
            lines = err.strip().splitlines()
            assert runs[override].returncode == 2, (override, err[-2000:])
            assert len(lines) == 1 and lines[0].startswith("efficientllm: error: "), (override, err[-2000:])
            assert expected in lines[0], (override, lines[0])
    finally:
        for run in runs.values():  # none is left running, whatever failed
            run.kill()
            run.wait()

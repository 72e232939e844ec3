"""Checkpoints on real ranks: exact resume, resharding, preemption and crashes during a save."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from efficientllm.training import checkpoint
from efficientllm.training.signals import EXIT_RESUMABLE
from tests.distributed.launch import REPO, run_ranks, start_ranks, wait_ranks

WORKER = str(REPO / "tests/distributed/workers/checkpoint.py")


def _records(world_size: int, out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def run_worker(world_size: int, mode: str, config: Path, out: Path, *overrides: str,
               expect: int | None = 0, env: dict[str, str] | None = None, timeout: float = 120) -> list:
    out.mkdir(parents=True, exist_ok=True)
    results = run_ranks(world_size, [WORKER, mode, str(out), str(config), *overrides], out / "logs",
                        timeout=timeout, extra_env=env, check=False)
    codes = [r.returncode for r in results]
    if expect is not None:
        assert codes == [expect] * world_size, f"exit codes {codes}, expected {expect}\n" + results[0].output[-3000:]
    return results


def train(world_size: int, config: Path, out: Path, *overrides: str, **kwargs) -> list[dict]:
    run_worker(world_size, "train", config, out, *overrides, **kwargs)
    return _records(world_size, out)


def layout(tp: int, pp: int, *more: str) -> list[str]:
    return [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}", *more]


def assert_same_final_state(a: list[dict], b: list[dict]) -> None:
    for rank, (x, y) in enumerate(zip(a, b)):
        assert (x["iteration"], x["consumed_samples"]) == (y["iteration"], y["consumed_samples"])
        assert x["losses"] == y["losses"], f"rank {rank}: losses differ from the uninterrupted run"
        assert x["digests"] == y["digests"], f"rank {rank}: weights differ from the uninterrupted run"
        assert x["optimizer"] == y["optimizer"], f"rank {rank}: optimizer state differs from the uninterrupted run"


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_and_the_resume_is_bit_identical(tiny_config, tmp_path):
    config = tiny_config(training={"train_iters": 6}, checkpoint={"save_interval": 3})
    base = train(1, config, tmp_path / "base", f"checkpoint.save={tmp_path / 'ckpt_base'}")
    save_dir = tmp_path / "ckpt"
    run_worker(1, "train", config, tmp_path / "killed", f"checkpoint.save={save_dir}",
               expect=-signal.SIGKILL, env={"CRASH_IN_SAVE": "6:0"})
    assert checkpoint.read_tracker(save_dir) == 3 and checkpoint.complete_iterations(save_dir) == [3]
    assert (save_dir / "iter_0000006.partial").is_dir(), "the crash must have happened mid-save"
    resumed = train(1, config, tmp_path / "resumed", f"checkpoint.save={save_dir}", f"checkpoint.load={save_dir}")
    assert resumed[0]["start_iteration"] == 3
    assert_same_final_state(base, resumed)
    assert not (save_dir / "iter_0000006.partial").exists(), "a crashed save's leftovers are cleaned up"


def _wait_for_line(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"'{text}' not in {log} after {timeout}s:\n{log.read_text()[-2000:]}")


def test_sigterm_to_one_rank_checkpoints_exits_75_and_the_distributed_optimizer_resumes_exactly(tiny_config, tmp_path):
    # PP=2 with the distributed optimizer: guards the shared-`step` problem after its load.
    config = tiny_config(training={"train_iters": 40})
    options = layout(1, 2, "parallel.use_distributed_optimizer=true")
    base = train(2, config, tmp_path / "base", *options, f"checkpoint.save={tmp_path / 'ckpt_base'}")
    save_dir = tmp_path / "ckpt"
    out = tmp_path / "preempted"
    out.mkdir()
    procs = start_ranks(2, [WORKER, "train", str(out), str(config), *options, f"checkpoint.save={save_dir}"], out / "logs")
    _wait_for_line(out / "logs/rank0.log", "[train] step 3 ", timeout=90)
    procs[1].send_signal(signal.SIGTERM)  # only one rank is told: all must stop at the same step
    results = wait_ranks(procs, out / "logs", timeout=90)
    assert [r.returncode for r in results] == [EXIT_RESUMABLE] * 2, results[0].output[-3000:]
    stopped_at = checkpoint.read_tracker(save_dir)
    assert 3 <= stopped_at < 40 and _records(2, out)[0]["iteration"] == stopped_at
    resumed = train(2, config, tmp_path / "resumed", *options, f"checkpoint.save={save_dir}", f"checkpoint.load={save_dir}")
    assert resumed[0]["start_iteration"] == stopped_at
    assert_same_final_state(base, resumed)


def test_checkpoint_saved_at_tp2pp2_after_pruning_loads_at_tp1pp1_and_tp1pp2_with_the_same_logits(
    tiny_config, tmp_path
):
    config = tiny_config(
        training={"train_iters": 4, "eval_interval": 4, "eval_iters": 1},
        prune={"enabled": True, "target_ratio": 0.6, "start_step": 2, "end_step": 3, "min_hidden": 16, "align": 2},
    )
    save_dir = tmp_path / "ckpt"
    train(4, config, tmp_path / "tp2pp2", *layout(2, 2), f"checkpoint.save={save_dir}", timeout=180)
    from efficientllm.architecture import Architecture

    pruned = Architecture.from_dict(checkpoint.read_meta(checkpoint.iteration_dir(save_dir, 4))["architecture"])
    assert not pruned.is_uniform, "the saved model has per-layer widths found by pruning"
    saved = torch.load(tmp_path / "tp2pp2/logits.pt")
    for tp, pp in ((1, 1), (1, 2)):
        out = tmp_path / f"tp{tp}pp{pp}"
        run_worker(tp * pp, "logits", config, out, *layout(tp, pp), f"checkpoint.load={save_dir}")
        loaded = torch.load(out / "logits.pt")
        torch.testing.assert_close(loaded["logits"], saved["logits"], rtol=1e-5, atol=1e-5)
        assert loaded["eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-5)


def test_resume_across_pruning_events_is_bit_identical(tiny_config, tmp_path):
    # Events at steps 3, 5, 7, 9. The first interruption (step 4) falls between events while the
    # Hessian window is open; the second (step 5) right after an event.
    config = tiny_config(
        training={"train_iters": 10},
        prune={"enabled": True, "target_ratio": 0.6, "start_step": 3, "end_step": 9, "interval": 2,
               "min_hidden": 16},
    )
    base = train(1, config, tmp_path / "base", f"checkpoint.save={tmp_path / 'ckpt_base'}")
    save_dir = tmp_path / "ckpt"
    common = (f"checkpoint.save={save_dir}", f"checkpoint.load={save_dir}")
    run_worker(1, "train", config, tmp_path / "first", *common, "training.exit_interval=4", expect=EXIT_RESUMABLE)
    run_worker(1, "train", config, tmp_path / "second", *common, "training.exit_interval=5", expect=EXIT_RESUMABLE)
    assert checkpoint.read_tracker(save_dir) == 5
    from efficientllm.architecture import Architecture
    from tests.distributed.conftest import TINY_MODEL

    source = Architecture.uniform(vocab_size=512, **TINY_MODEL)
    pruned = Architecture.from_dict(checkpoint.read_meta(checkpoint.iteration_dir(save_dir, 5))["architecture"])
    assert pruned.num_parameters() < source.num_parameters(), "the checkpoint holds the pruned model"
    resumed = train(1, config, tmp_path / "resumed", *common)
    assert resumed[0]["start_iteration"] == 5
    assert_same_final_state(base, resumed)

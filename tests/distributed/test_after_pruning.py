"""The rebuild after the last pruning event (`model.transformer_impl_after_pruning`) is exact:
checkpoint, rebuild, load, and training goes on as if nothing happened, also when resumed.

The CPU runs it with the local spec on both sides (Transformer Engine is not installed here);
bench/gpu_check.sh runs it with TE where TE is importable."""

from __future__ import annotations

import json

from tests.distributed.conftest import train_on_ranks

PRUNE = {"enabled": True, "target_ratio": 0.6, "start_step": 2, "end_step": 4, "interval": 1,
         "min_hidden": 16, "align": 2}


def test_the_rebuilt_model_trains_on_exactly_and_resumes_with_the_event_record(tiny_config, tmp_path):
    plain = tiny_config(training={"train_iters": 7}, prune=PRUNE)
    base = train_on_ranks(1, plain, tmp_path / "plain")[0]

    rebuilt = tiny_config(training={"train_iters": 7}, prune=PRUNE,
                          model={"transformer_impl_after_pruning": "local"})
    save = tmp_path / "ckpt"
    stopped = train_on_ranks(1, rebuilt, tmp_path / "rebuilt", f"checkpoint.save={save}",
                             "training.exit_interval=5")[0]
    log = (tmp_path / "rebuilt/logs/rank0.log").read_text()
    assert "pruning finished at iteration 4: training on with local layers" in log
    assert (save / "iter_0000004").is_dir(), "the pruned model is checkpointed where it was rebuilt"
    assert stopped["losses"] == base["losses"][:5], "bit-identical after the rebuild"

    resumed = train_on_ranks(1, rebuilt, tmp_path / "resumed", f"checkpoint.save={save}",
                             f"checkpoint.load={save}")[0]
    assert resumed["losses"] == base["losses"]
    assert resumed["architecture"] == base["architecture"]
    assert resumed["plans"] == base["plans"] and len(base["plans"]) == 3
    meta = json.loads((save / "iter_0000007/efficientllm.json").read_text())
    assert meta["extra"]["pruning"]["events"] == 3, "the event record survives the rebuild and the resume"

"""Prune-then-train from another run's checkpoint, as the experiment's C arms run it: a finetune
(`checkpoint.finetune`) from a source checkpoint, pruned once to a target architecture with
Minitron's activation saliency, preempted after the event, and resumed from its own checkpoint
rather than from the source again."""

from __future__ import annotations

import json

from efficientllm.architecture import Architecture
from efficientllm.config import load_config
from efficientllm.training import checkpoint
from efficientllm.training.signals import EXIT_RESUMABLE
from tests.distributed.test_checkpoint_resume import run_worker

TARGET = {"hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 2, "ffn_hidden_size": 64}


def _source_checkpoint(single_rank, config_path, run_dir, save_dir) -> None:
    """The source: the tiny model's iteration-0 checkpoint, saved in this process."""
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    config = load_config(config_path, [f"run_dir={run_dir}", f"checkpoint.save={save_dir}",
                                       "checkpoint.load=null", "checkpoint.finetune=false", "prune.enabled=false"])
    trainer = Trainer(config, single_rank)
    trainer.dp_rank, trainer.dp_size = 0, 1
    trainer.build_model(architecture_from_config(config, 512))
    checkpoint.save(trainer, save_dir)


def test_a_preempted_prune_once_finetune_resumes_from_its_own_checkpoint(single_rank, tiny_config, tmp_path):
    source, save = tmp_path / "source", tmp_path / "ckpt"
    config = tiny_config(
        training={"train_iters": 5},
        checkpoint={"load": str(source), "finetune": True, "save": str(save)},
        prune={"enabled": True, "target_architecture": TARGET, "start_step": 2, "end_step": 2, "align": 2,
               "min_hidden": 16},
        saliency={"criterion": "activation", "hessian_window": 2},
    )
    _source_checkpoint(single_rank, config, tmp_path / "source_run", source)

    first = run_worker(1, "train", config, tmp_path / "first", "training.exit_interval=3", expect=EXIT_RESUMABLE)
    assert f"started from the model weights of {source}/iter_0000000" in first[0].output
    assert json.loads((tmp_path / "first/rank0.json").read_text())["start_iteration"] == 0
    pruned = Architecture.from_dict(checkpoint.read_meta(checkpoint.iteration_dir(save, 3))["architecture"])
    assert (pruned.hidden_size, pruned.layers[0].num_attention_heads, pruned.layers[0].ffn_hidden_size) == (48, 2, 64)

    resumed = run_worker(1, "train", config, tmp_path / "resumed")  # checkpoint.load still names the source
    assert f"resumed from {save}/iter_0000003 at iteration 3" in resumed[0].output
    record = json.loads((tmp_path / "resumed/rank0.json").read_text())
    assert record["start_iteration"] == 3 and record["iteration"] == 5
    assert Architecture.from_dict(record["architecture"]) == pruned, "no second event, no return to the source"

"""Checkpoint files on one in-process rank: layout, atomicity, corruption, config checks, inspect."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from efficientllm.architecture import Architecture
from efficientllm.config import Config
from efficientllm.training import checkpoint
from efficientllm.training.checkpoint import CheckpointError
from efficientllm.training.signals import PreemptionHandler

ARCH = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)


def _config(tmp_path) -> Config:
    config = Config(run_dir=str(tmp_path / "run"))
    for key, value in ARCH.items():
        setattr(config.model, key, value)
    config.model.vocab_size = 128
    config.training.micro_batch_size = config.training.global_batch_size = 2
    config.checkpoint.save = str(tmp_path / "ckpt")
    return config


@pytest.fixture
def trainer(single_rank, tmp_path):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    t = Trainer(_config(tmp_path), single_rank)
    t.dp_rank, t.dp_size = 0, 1
    t.build_model(architecture_from_config(t.config, 128))
    return t


def _step(trainer, seed: int) -> None:
    """One optimizer step on made-up gradients (gives the optimizer real state)."""
    generator = torch.Generator().manual_seed(seed)
    for chunk in trainer.model:
        for p in chunk.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=generator))
    trainer.optimizer.step()
    trainer.scheduler.step(increment=2)
    trainer.state.iteration += 1
    trainer.state.consumed_samples += 2


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model[0].named_parameters()}


def test_a_save_is_megatron_layout_with_the_tracker_and_a_manifest(trainer):
    _step(trainer, 0)
    path = checkpoint.save(trainer, trainer.save_dir)
    assert path.name == "iter_0000001"
    assert (trainer.save_dir / checkpoint.TRACKER).read_text().strip() == "1"
    names = {p.name for p in path.iterdir()}
    assert {"metadata.json", "common.pt", checkpoint.META, checkpoint.TRAINER_STATE, checkpoint.MANIFEST} <= names
    meta = checkpoint.verify(path)
    assert Architecture.from_dict(meta["architecture"]) == trainer.arch
    assert meta["parallel"]["tensor_model_parallel_size"] == 1 and meta["consumed_samples"] == 2


def test_load_restores_weights_optimizer_scheduler_and_position(trainer):
    _step(trainer, 0)
    path = checkpoint.save(trainer, trainer.save_dir)
    saved, lr = _weights(trainer), trainer.optimizer.param_groups[0]["lr"]
    _step(trainer, 1)
    checkpoint.load(trainer, path)
    assert all(torch.equal(saved[n], w) for n, w in _weights(trainer).items())
    assert trainer.state.iteration == 1 and trainer.optimizer.param_groups[0]["lr"] == lr
    steps = [s["step"] for s in trainer.optimizer.optimizer.state.values()]
    assert all(float(s) == 1 for s in steps)


def test_keep_last_removes_older_checkpoints_only(trainer):
    trainer.config.checkpoint.keep_last = 2
    for _ in range(3):
        _step(trainer, 0)
        checkpoint.save(trainer, trainer.save_dir)
    assert checkpoint.complete_iterations(trainer.save_dir) == [2, 3]


def test_a_crash_inside_a_save_leaves_the_previous_checkpoint_loadable(trainer, monkeypatch):
    _step(trainer, 0)
    checkpoint.save(trainer, trainer.save_dir)
    _step(trainer, 1)
    monkeypatch.setattr(checkpoint, "write_manifest", lambda *_: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        checkpoint.save(trainer, trainer.save_dir)
    assert checkpoint.find_checkpoint(trainer.save_dir).name == "iter_0000001"


def test_a_truncated_shard_is_named_and_fallback_loads_the_previous_one(trainer, capsys):
    for seed in (0, 1):
        _step(trainer, seed)
        checkpoint.save(trainer, trainer.save_dir)
    shard = sorted((trainer.save_dir / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated.*fallback_to_previous"):
        checkpoint.find_checkpoint(trainer.save_dir)
    assert checkpoint.find_checkpoint(trainer.save_dir, fallback_to_previous=True).name == "iter_0000001"
    assert "falling back" in capsys.readouterr().out


def test_missing_metadata_is_named(trainer):
    _step(trainer, 0)
    path = checkpoint.save(trainer, trainer.save_dir)
    (path / checkpoint.META).unlink()
    with pytest.raises(CheckpointError, match=f"{checkpoint.META} is missing"):
        checkpoint.find_checkpoint(trainer.save_dir)


def test_an_empty_save_directory_means_a_fresh_start(tmp_path):
    assert checkpoint.find_checkpoint(tmp_path / "nothing") is None


def test_a_model_config_that_disagrees_with_the_checkpoint_is_an_error(trainer, tmp_path):
    _step(trainer, 0)
    path = checkpoint.save(trainer, trainer.save_dir)
    other = _config(tmp_path)
    other.model.ffn_hidden_size = 256
    with pytest.raises(CheckpointError, match="model.ffn_hidden_size: config 256 vs checkpoint 128"):
        checkpoint.architecture_for_load(checkpoint.read_meta(path), other, path)


def test_a_tp_size_that_does_not_divide_the_widths_lists_the_valid_ones(trainer, tmp_path):
    _step(trainer, 0)
    path = checkpoint.save(trainer, trainer.save_dir)
    other = _config(tmp_path)
    other.parallel.tensor_model_parallel_size = 4
    with pytest.raises(CheckpointError, match=r"tensor_model_parallel_size 4.*TP sizes \[1, 2\]"):
        checkpoint.architecture_for_load(checkpoint.read_meta(path), other, path)


def test_inspect_json_has_the_architecture_iteration_and_tokens(trainer, capsys):
    from efficientllm.cli import main

    _step(trainer, 0)
    checkpoint.save(trainer, trainer.save_dir)
    assert main(["inspect", str(trainer.save_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"]["hidden_size"] == 64 and d["iteration"] == 1
    assert d["architecture"]["layers"][1]["num_attention_heads"] == 4
    assert d["architecture"]["layers"][1]["num_query_groups"] == 2
    assert d["architecture"]["layers"][1]["ffn_hidden_size"] == 128
    assert d["num_parameters"] == trainer.arch.num_parameters()
    assert d["consumed_tokens"] == 2 * trainer.config.data.seq_length
    assert main(["inspect", str(trainer.save_dir)]) == 0
    assert "iteration 1" in capsys.readouterr().out


def test_inspect_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from efficientllm.cli import main

    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_sigterm_and_sigusr1_set_the_preemption_flag():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        handler = PreemptionHandler().install()
        try:
            os.kill(os.getpid(), sig)
            assert handler.requested and handler.received == sig
        finally:
            handler.uninstall()


def test_megatron_still_shares_one_step_tensor_in_the_distributed_optimizer_load():
    # If this fails, megatron fixed it: drop megatron_patches/distrib_optimizer.py.
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_patches import distrib_optimizer

    source = inspect.getsource(DistributedOptimizer.load_state_dict.__wrapped__)
    assert 's["step"] = step' in source
    shared = torch.tensor(3.0)

    class Inner:
        state = {0: {"step": shared}, 1: {"step": shared}}

    distrib_optimizer._clone_shared_steps(Inner)
    a, b = Inner.state[0]["step"], Inner.state[1]["step"]
    assert a is not b and float(a) == float(b) == 3.0


def test_model_weights_alone_load_into_a_fresh_model_built_from_the_stored_architecture(trainer):
    from efficientllm.model import build_model_chunks

    _step(trainer, 0)
    _step(trainer, 1)  # the first step runs at warmup LR 0
    path = checkpoint.save(trainer, trainer.save_dir)
    arch = Architecture.from_dict(checkpoint.read_meta(path)["architecture"])
    fresh = build_model_chunks(arch, trainer.options)
    before = {n: p.detach().clone() for n, p in fresh[0].named_parameters()}
    meta = checkpoint.load_model_weights(fresh, path)
    assert meta["iteration"] == 2
    saved = {n: p.detach() for n, p in trainer.model[0].module.named_parameters()}
    loaded = {n: p.detach() for n, p in fresh[0].named_parameters()}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[n], saved[n].to(loaded[n].dtype)) for n in saved)
    assert any(not torch.equal(before[n], loaded[n]) for n in before)

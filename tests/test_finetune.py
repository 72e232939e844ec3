"""Starting a run from another run's checkpoint (Megatron-LM's --finetune) on one in-process
rank: which checkpoint a run starts from and how, and what a weights start loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from efficientllm.config import ConfigError, load_config
from efficientllm.data.tokenizer import load_tokenizer
from efficientllm.training import checkpoint
from efficientllm.training.checkpoint import CheckpointError
from efficientllm.training.start import resolve_start, with_checkpoint_tokenizer
from tests.distributed.conftest import tiny_corpus  # noqa: F401  (the session's corpus fixture)
from tests.test_checkpoint import _config, _step, _weights

CODE = "def main(argv):\n    return 0\n"


@pytest.fixture
def source(single_rank, tmp_path):
    """A trained run (two optimizer steps) and its save directory."""
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    trainer = Trainer(_config(tmp_path / "source"), single_rank)
    trainer.dp_rank, trainer.dp_size = 0, 1
    trainer.build_model(architecture_from_config(trainer.config, 128))
    for seed in (0, 1):
        _step(trainer, seed)
    checkpoint.save(trainer, trainer.save_dir)
    return trainer


def _finetune(source, tmp_path, **fields):
    config = _config(tmp_path / "finetune")
    fields = {"load": str(source.save_dir), "finetune": True, **fields}
    config.checkpoint = dataclasses.replace(config.checkpoint, **fields)
    return config


def test_a_finetune_loads_the_weights_alone_with_a_fresh_optimizer_schedule_and_iteration(single_rank, source, tmp_path):
    from efficientllm.training.trainer import Trainer

    trainer = Trainer(_finetune(source, tmp_path), single_rank)
    trainer.dp_rank, trainer.dp_size = 0, 1
    start = resolve_start(trainer.config, trainer.save_dir)
    assert start.checkpoint == checkpoint.iteration_dir(source.save_dir, 2) and start.weights_only
    meta = checkpoint.read_meta(start.checkpoint)
    trainer.build_model(checkpoint.architecture_for_load(meta, trainer.config, start.checkpoint))
    fresh_lr = trainer.optimizer.param_groups[0]["lr"]
    checkpoint.start_from_weights(trainer, start.checkpoint)
    expected = _weights(source)
    assert all(torch.equal(expected[n], w) for n, w in _weights(trainer).items())
    assert trainer.optimizer.optimizer.state == {} and trainer.scheduler.num_steps == 0
    assert trainer.state.iteration == 0 and trainer.state.consumed_samples == 0
    assert trainer.optimizer.param_groups[0]["lr"] == fresh_lr != source.optimizer.param_groups[0]["lr"]


def test_once_the_finetune_has_its_own_checkpoint_that_one_is_resumed(single_rank, source, tmp_path):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    config = _finetune(source, tmp_path)
    trainer = Trainer(config, single_rank)
    trainer.dp_rank, trainer.dp_size = 0, 1
    trainer.build_model(architecture_from_config(config, 128))
    _step(trainer, 5)
    own = checkpoint.save(trainer, trainer.save_dir)
    start = resolve_start(config, trainer.save_dir)
    assert start.checkpoint == own and start.resumes


def test_without_finetune_a_load_resumes_everything(source, tmp_path):
    config = _finetune(source, tmp_path, finetune=False)
    start = resolve_start(config, tmp_path / "finetune" / "ckpt")
    assert start.checkpoint == checkpoint.iteration_dir(source.save_dir, 2) and start.resumes


def test_a_finetune_from_a_directory_without_a_checkpoint_is_an_error(source, tmp_path):
    config = _finetune(source, tmp_path, load=str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="checkpoint.finetune: no checkpoint in .*nothing"):
        resolve_start(config, tmp_path / "finetune" / "ckpt")


def test_finetune_without_a_checkpoint_to_load_is_refused_at_load():
    with pytest.raises(ConfigError, match="checkpoint.finetune needs checkpoint.load"):
        load_config(None, ["checkpoint.finetune=true"])


def test_a_finetune_reads_its_data_with_the_tokenizer_of_the_checkpoint_it_starts_from(source, tiny_corpus,
                                                                                        tmp_path):
    config = _finetune(source, tmp_path)
    assert with_checkpoint_tokenizer(config) is config  # it stores none: the data section's own
    tokenizer = load_tokenizer(tiny_corpus["tokenizer"])
    tokenizer.save(checkpoint.find_checkpoint(source.save_dir) / checkpoint.TOKENIZER_DIR)  # as a run with data does
    stored = with_checkpoint_tokenizer(config).data.tokenizer_model
    assert Path(stored).is_relative_to(source.save_dir)
    assert load_tokenizer(stored).tokenize(CODE) == tokenizer.tokenize(CODE)
    config.data.tokenizer_model = "mine.model"
    assert with_checkpoint_tokenizer(config).data.tokenizer_model == "mine.model"

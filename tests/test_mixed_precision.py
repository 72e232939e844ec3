"""bf16 with fp32 main params (`training.bf16`), as on a GPU, on one in-process rank: every
parameter is bf16 (norms too), the optimizer steps fp32 masters, and a checkpoint round-trips."""

from __future__ import annotations

import pytest
import torch

from efficientllm import distributed
from efficientllm.config import Config
from efficientllm.training import checkpoint


@pytest.fixture
def bf16_trainer(single_rank, tmp_path):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    config = Config(run_dir=str(tmp_path / "run"))
    config.model.hidden_size, config.model.num_layers, config.model.ffn_hidden_size = 64, 2, 128
    config.model.num_attention_heads, config.model.num_query_groups, config.model.vocab_size = 4, 2, 128
    config.training.micro_batch_size = config.training.global_batch_size = 2
    config.training.bf16 = True
    config.checkpoint.save = str(tmp_path / "ckpt")
    t = Trainer(config, single_rank)
    t.dp_rank, t.dp_size = 0, 1
    t.build_model(architecture_from_config(config, 128))
    return t


def _leaf_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def test_every_parameter_is_bf16_on_the_ranks_device_and_the_masters_are_fp32(bf16_trainer):
    params = dict(bf16_trainer.model[0].module.named_parameters())
    assert "decoder.layers.0.input_layernorm.weight" in params
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert {p.device for p in params.values()} == {distributed.device()}
    assert {b.grad_data.device for b in bf16_trainer.model[0].buffers} == {distributed.device()}
    masters = [p for leaf in _leaf_optimizers(bf16_trainer.optimizer) for g in leaf.optimizer.param_groups
               for p in g["params"]]
    assert len(masters) == len(params) and {p.dtype for p in masters} == {torch.float32}


def test_a_bf16_step_updates_the_fp32_masters_and_a_checkpoint_round_trips(bf16_trainer):
    t = bf16_trainer
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # the first step runs at warmup LR 0
        for p in t.model[0].parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=generator))
        assert t.optimizer.step()[0], "the step was applied"
        t.scheduler.step(increment=2)
        t.state.iteration += 1
    weights = {n: p.detach().clone() for n, p in t.model[0].named_parameters()}
    masters = [p.detach().clone() for leaf in _leaf_optimizers(t.optimizer) for g in leaf.optimizer.param_groups
               for p in g["params"]]
    assert any(not torch.equal(m.to(torch.bfloat16), m) for m in masters), "masters keep more than bf16 bits"
    path = checkpoint.save(t, t.save_dir)
    for p in t.model[0].parameters():
        p.detach().zero_()
    checkpoint.load(t, path)
    assert all(torch.equal(p, weights[n]) for n, p in t.model[0].named_parameters())
    loaded = [p for leaf in _leaf_optimizers(t.optimizer) for g in leaf.optimizer.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(loaded, masters))

"""The OBS updates of an event's compensated consumers (`pruning/megatron/obs.py`) on one rank,
from a real window of a real training step: the consumers the Plan cuts into get the update OBS
computes from their Hessian; one without data is reported and left to plain slicing. (Dealing
the consumers over DP ranks is checked by the DP2 runs of test_pruning_distributed_optimizer.py,
whose losses equal the DP1 run's.)"""

from __future__ import annotations

import torch

from efficientllm.model import build_model_chunks
from efficientllm.pruning.compensation import obs_remove_columns
from efficientllm.pruning.layout import complement
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.obs import consumer_updates
from efficientllm.pruning.plan import Plan
from tests.distributed.workers.surgery import ARCH, batches, options, train_step, training


def test_each_compensated_consumer_gets_its_obs_update_and_one_without_data_is_reported(single_rank):
    model, optimizer = training()(build_model_chunks(ARCH, options()))
    window = HessianCollector(model, ARCH)
    window.open_window()
    train_step(model, optimizer, batches())
    window.close_window()
    window.hessians[(0, "linear_fc2")].zero_()  # no data: OBS cannot compensate it
    plan = Plan(heads={1: [0, 2]}, ffn={0: [3, 4]})

    updates, fallbacks = consumer_updates(window, plan, ARCH, damping=0.01)

    assert set(updates) == {(1, "linear_proj")}
    assert len(fallbacks) == 1 and fallbacks[0].startswith("layers.0.linear_fc2: ") and "no data" in fallbacks[0]
    proj = model[0].module.decoder.layers[1].self_attention.linear_proj.weight.detach()
    removed = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])  # heads 0 and 2, d = 16
    update = updates[(1, "linear_proj")]
    assert update.drop.tolist() == removed.tolist() and update.keep.tolist() == complement(64, removed).tolist()
    expected = obs_remove_columns(proj, window.hessians[(1, "linear_proj")], removed).weight
    torch.testing.assert_close(update.apply(proj).float(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected, proj[:, update.keep])  # it does compensate

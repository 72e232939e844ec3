"""Hidden channels under RMSNorm: the norm rescale keeps what the kept channels' consumers see."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from efficientllm.model import build_model_chunks
from efficientllm.pruning.layout import kept_hidden
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.surgery import prune_model
from efficientllm.pruning.megatron.sync import reduce_window_over_dp
from efficientllm.pruning.norms import rms_rescale
from efficientllm.pruning.plan import Plan
from tests.distributed.workers.surgery import ARCH, batches, logits, options, train_step, training

H = ARCH.hidden_size


def test_the_rescale_keeps_the_energy_weighted_mean_square():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(100, 16, generator=g) * torch.linspace(0.1, 2.0, 16)).double()
    keep = torch.arange(3, 16)
    energy, tokens = (x * x).sum(0), x.shape[0]
    s = rms_rescale(16, keep, energy, tokens, eps=1e-5)
    before = (x * x).mean() + 1e-5
    after = (x[:, keep] ** 2).mean() + 1e-5
    assert s == pytest.approx(math.sqrt(after / before), rel=1e-12)
    # no statistics: the removed channels are taken to carry no energy
    assert rms_rescale(16, keep) == pytest.approx(math.sqrt(16 / 13))
    with pytest.raises(ValueError, match="cannot keep 0"):
        rms_rescale(16, torch.arange(0))


def _window(chunks, data) -> HessianCollector:
    """The Hessians and residual energies of training-mode forwards over `data`."""
    window = HessianCollector(chunks, ARCH, energies=True)
    window.open_window()
    with torch.no_grad():
        for batch in data:
            chunks[0].train()
            chunks[0](batch["tokens"], batch["position_ids"], None)
    window.close_window()
    reduce_window_over_dp(window)
    return window


def _relative_error(new: torch.Tensor, ref: torch.Tensor) -> float:
    return float((new - ref).norm() / ref.norm())


def _pruned_logits(chunks, plan: Plan, window: HessianCollector, corrected: bool, data) -> torch.Tensor:
    scales = window.norm_scales(H, kept_hidden(ARCH, plan.hidden)) if corrected else {}
    return logits(prune_model(chunks, plan, ARCH, options(), dict(window.hessians), norm_scales=scales).chunks, data)


def test_a_residual_channel_that_is_zero_prunes_with_unchanged_logits(single_rank):
    chunks = build_model_chunks(ARCH, options())
    gpt, channel = chunks[0], 5
    with torch.no_grad():  # nothing writes channel 5 of the residual stream
        gpt.embedding.word_embeddings.weight[:, channel] = 0
        for layer in gpt.decoder.layers:
            layer.self_attention.linear_proj.weight[channel] = 0
            layer.mlp.linear_fc2.weight[channel] = 0
    data = batches(seed=1)
    before = logits(chunks, data)
    window = _window(chunks, data)
    plan = Plan(hidden=[channel])
    corrected = _relative_error(_pruned_logits(chunks, plan, window, True, data), before)
    uncorrected = _relative_error(_pruned_logits(chunks, plan, window, False, data), before)
    # unchanged up to the norms' eps (1e-5 against a mean square of ~4e-4 at this init)
    assert corrected < 1e-4, corrected
    assert uncorrected > 100 * corrected, (corrected, uncorrected)


@pytest.mark.parametrize("removed", [4, 8])
def test_on_real_channels_the_rescale_lowers_the_error_of_an_event(single_rank, removed):
    build = training()
    model, optimizer = build(build_model_chunks(ARCH, options()))
    for step in range(30):
        train_step(model, optimizer, batches(seed=100 + step))
    chunks = [m.module for m in model]
    data = batches(seed=1)
    before = logits(chunks, data)
    window = _window(chunks, batches(seed=7, num=4))
    energy = sum(e / e.sum() for e in window.energies.values())
    plan = Plan(hidden=torch.argsort(energy)[:removed].tolist())  # the least energetic, as pruning would
    errors = {}
    for corrected in (True, False):
        after = _pruned_logits(chunks, plan, window, corrected, data)
        kl = F.kl_div(F.log_softmax(after.double(), -1), F.log_softmax(before.double(), -1),
                      log_target=True, reduction="batchmean")
        errors[corrected] = (_relative_error(after, before), float(kl))
    assert errors[True][0] < errors[False][0] and errors[True][1] < errors[False][1], errors

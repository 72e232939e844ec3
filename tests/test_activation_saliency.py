"""Minitron's activation-magnitude saliency (`saliency.criterion: activation`) on a real
megatron-core model, one rank: the window's hooks aggregate each consumer's input like ModelOpt
(mean |x| over a sequence, L2 over the sequences), heads / FFN channels / hidden channels are
scored from it, and nothing is collected outside the window."""

from __future__ import annotations

import torch

from efficientllm.config import SaliencyConfig
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.saliency import SaliencyAccumulator
from efficientllm.pruning.megatron.sync import global_score_table, reduce_window_over_dp
from tests.test_saliency import build, tiny_arch, train_step

INPUTS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _minitron(x: torch.Tensor) -> torch.Tensor:
    """Independent of the hooks: per channel, L2 over the sequences of the mean |x| of each."""
    per_sequence = x.double().abs().mean(0)  # [sequence, batch, width] -> [batch, width]
    return per_sequence.square().sum(0).sqrt()


def test_activation_scores_are_minitrons_aggregation_of_each_layers_inputs(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True, criterion="activation"))
    window = HessianCollector(model, arch, hessians=False, activations=True)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for l, block in enumerate(model[0].module.decoder.layers):
        modules = (block.self_attention.linear_qkv, block.self_attention.linear_proj, block.mlp.linear_fc1,
                   block.mlp.linear_fc2)
        for name, module in zip(INPUTS, modules):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, key=(l, name): seen.setdefault(key, []).append(args[0].detach().clone())))
    train_step(model, optimizer, 0, arch.vocab_size, before_step=acc.update)  # window closed
    assert window.activations == {}
    seen.clear()
    window.open_window()
    for step in (1, 2):
        train_step(model, optimizer, step, arch.vocab_size, before_step=acc.update)
    window.close_window()
    for handle in handles:
        handle.remove()
    reduce_window_over_dp(window)
    table = global_score_table(acc, window=window)

    a = {key: _minitron(torch.cat(xs, dim=1)) for key, xs in seen.items()}  # all sequences of the window
    hidden = torch.zeros(arch.hidden_size, dtype=torch.float64)
    for l, widths in enumerate(arch.layers):
        heads = a[(l, "linear_proj")].view(widths.num_attention_heads, arch.head_dim).norm(dim=1)
        torch.testing.assert_close(table["head"][l], heads, rtol=1e-6, atol=0)
        torch.testing.assert_close(table["ffn"][l], a[(l, "linear_fc2")], rtol=1e-6, atol=0)
        assert torch.equal(table["kv_group"][l], torch.zeros(widths.num_query_groups, dtype=torch.float64))
        hidden += a[(l, "linear_qkv")] + a[(l, "linear_fc1")]
    torch.testing.assert_close(table["hidden"], hidden, rtol=1e-6, atol=0)
    assert all(float(s["head_fisher"].abs().sum()) == 0 for s in acc.stats.values()), "no gradient statistics"
    assert float(table["layer"].min()) > 0, "layers keep their 1 - cos score"


def test_the_window_state_round_trips_with_its_activations(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    window = HessianCollector(model, arch, hessians=False, activations=True)
    window.open_window()
    train_step(model, optimizer, 0, arch.vocab_size)
    window.close_window()
    copy = HessianCollector(model, arch, hessians=False, activations=True)
    copy.load_state_dict(window.state_dict())
    assert set(copy.activations) == {(l, name) for l in range(arch.num_layers) for name in INPUTS}
    assert all(torch.equal(copy.activations[k], v) for k, v in window.activations.items())

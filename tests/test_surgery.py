"""Surgery in one process (TP1 PP1): mask equivalence, shapes, optimizer moments, training on."""

from __future__ import annotations

import math

import pytest
import torch

from efficientllm.model import build_model_chunks
from efficientllm.pruning.compensation import obs_remove_columns
from efficientllm.pruning.plan import Plan
from efficientllm.pruning.surgery import (
    mask_model,
    param_slices,
    prune_model,
    slice_optimizer_state,
    unwrap,
)
from tests.distributed.workers.surgery import ARCH, batches, logits, options, train_step, training

# At TP1 a KV group may go whole (layer 1 loses group 1 = heads 2, 3).
HEAD_FFN = Plan(heads={0: [1, 3], 1: [2, 3], 3: [0, 2]}, ffn={0: [0, 5, 77], 2: [127], 3: list(range(0, 128, 2))})
WITH_LAYER = Plan(heads={0: [1, 3]}, ffn={1: [3]}, layers=[2])


def _params(chunks) -> int:
    return sum(p.numel() for c in chunks for p in unwrap(c).parameters())


@pytest.mark.parametrize("plan", [HEAD_FFN, WITH_LAYER], ids=["heads+ffn", "with-layer"])
def test_pruned_model_equals_masked_model(single_rank, plan):
    data = batches(num=1)
    old = build_model_chunks(ARCH, options())
    masked = build_model_chunks(ARCH, options())
    mask_model(masked, plan, ARCH)
    pruned = prune_model(old, plan, ARCH, options())
    new_arch = plan.apply(ARCH)
    assert _params(pruned) == new_arch.num_parameters()
    torch.testing.assert_close(logits(pruned, data), logits(masked, data), rtol=1e-5, atol=1e-5)
    # the mask matters: the unmasked model differs
    assert not torch.allclose(logits(old, data), logits(masked, data), atol=1e-3)


def test_hidden_removal_shapes_and_slices(single_rank):
    plan = Plan(hidden=[0, 7, 63], heads={0: [1, 3]}, ffn={1: [3, 4]})
    old = build_model_chunks(ARCH, options())
    new = prune_model(old, plan, ARCH, options())
    new_arch = plan.apply(ARCH)
    assert new_arch.hidden_size == 61
    assert _params(new) == new_arch.num_parameters()
    keep = [i for i in range(64) if i not in (0, 7, 63)]
    o, n = old[0], new[0]
    assert torch.equal(n.embedding.word_embeddings.weight, o.embedding.word_embeddings.weight[:, keep])
    assert torch.equal(n.output_layer.weight, o.output_layer.weight[:, keep])
    assert torch.equal(n.decoder.final_layernorm.weight, o.decoder.final_layernorm.weight[keep])
    # layer 0 (4 heads, 2 groups, d 16): keep heads 0 and 2 -> rows q0, k0, v0, q2, k1, v1
    d = 16
    rows = [*range(0, d), *range(2 * d, 4 * d), *range(4 * d, 5 * d), *range(6 * d, 8 * d)]
    qkv_old = o.decoder.layers[0].self_attention.linear_qkv.weight
    assert torch.equal(n.decoder.layers[0].self_attention.linear_qkv.weight, qkv_old[rows][:, keep])
    proj_old = o.decoder.layers[0].self_attention.linear_proj.weight
    cols = [*range(0, d), *range(2 * d, 3 * d)]
    assert torch.equal(n.decoder.layers[0].self_attention.linear_proj.weight, proj_old[keep][:, cols])
    fc1_old = o.decoder.layers[1].mlp.linear_fc1.weight
    ffn_keep = [c for c in range(128) if c not in (3, 4)]
    fc1_rows = ffn_keep + [128 + c for c in ffn_keep]
    assert torch.equal(n.decoder.layers[1].mlp.linear_fc1.weight, fc1_old[fc1_rows][:, keep])
    fc2_old = o.decoder.layers[1].mlp.linear_fc2.weight
    assert torch.equal(n.decoder.layers[1].mlp.linear_fc2.weight, fc2_old[keep][:, ffn_keep])
    assert math.isfinite(float(logits(new, batches(num=1)).sum()))


def test_compensation_from_hessian(single_rank):
    plan = Plan(ffn={0: [1, 2]}, heads={1: [0, 2]})
    old = build_model_chunks(ARCH, options())
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    H_fc2 = x.T @ x
    y = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    H_proj = y.T @ y
    new = prune_model(old, plan, ARCH, options(), compensation={(0, "linear_fc2"): H_fc2, (1, "linear_proj"): H_proj})
    fc2 = old[0].decoder.layers[0].mlp.linear_fc2.weight
    expected = obs_remove_columns(fc2, H_fc2, torch.tensor([1, 2])).weight
    assert torch.equal(new[0].decoder.layers[0].mlp.linear_fc2.weight, expected)
    proj = old[0].decoder.layers[1].self_attention.linear_proj.weight
    expected = obs_remove_columns(proj, H_proj, torch.cat([torch.arange(0, 16), torch.arange(32, 48)])).weight
    assert torch.equal(new[0].decoder.layers[1].self_attention.linear_proj.weight, expected)
    # consumers without an entry are sliced plainly
    fc1 = old[0].decoder.layers[0].mlp.linear_fc1.weight
    keep = [c for c in range(128) if c not in (1, 2)]
    assert torch.equal(new[0].decoder.layers[0].mlp.linear_fc1.weight, fc1[keep + [128 + c for c in keep]])


def test_optimizer_moments_survive_and_training_continues(single_rank):
    plan = HEAD_FFN.union(Plan(hidden=[5, 6]))
    data = batches()
    build = training()
    model, optimizer = build(build_model_chunks(ARCH, options()))
    for _ in range(2):
        train_step(model, optimizer, data)
    new_model, new_optimizer = build(prune_model(model, plan, ARCH, options()))
    moved = slice_optimizer_state(optimizer, model, new_optimizer, new_model, plan, ARCH)
    slices = param_slices(model, new_model, plan, ARCH)
    assert moved == len(slices) == len(list(new_model[0].parameters()))
    old_state, new_state = optimizer.optimizer.state, new_optimizer.optimizer.state
    for s in slices:
        old, new = old_state[s.old], new_state[s.new]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = old[key]
            if s.rows is not None:
                expected = expected[s.rows]
            if s.cols is not None:
                expected = expected[:, s.cols]
            assert torch.equal(new[key], expected), (s.name, key)
        assert float(new["step"]) == float(old["step"]) == 2.0
    # spot check with hand-made indices: fc2 of layer 2 loses column 127, hidden rows 5, 6
    fc2 = "decoder.layers.2.mlp.linear_fc2.weight"
    s = next(s for s in slices if s.name == fc2)
    keep = [i for i in range(64) if i not in (5, 6)]
    assert torch.equal(new_state[s.new]["exp_avg"], old_state[s.old]["exp_avg"][keep][:, :127])
    after = train_step(new_model, new_optimizer, data)
    assert math.isfinite(after)


def test_distributed_optimizer_is_refused(single_rank):
    from efficientllm.pruning import surgery

    class DistributedOptimizer:  # stands in for megatron's, by name
        optimizer = None

    with pytest.raises(NotImplementedError, match="DistributedOptimizer"):
        surgery._main_params(DistributedOptimizer())


def test_plan_out_of_range_fails_before_building(single_rank):
    old = build_model_chunks(ARCH, options())
    with pytest.raises(ValueError):
        prune_model(old, Plan(ffn={0: [500]}), ARCH, options())


def test_mixed_precision_main_params_are_sliced(single_rank):
    """Float16OptimizerWithFloat16Params' layout (megatron refuses bf16 params on CPU, so its
    attributes are mimicked): main params and their moments are sliced like the weights; a
    compensated weight (not the rounding of its sliced main param) restarts its main param."""
    from types import SimpleNamespace

    plan = Plan(heads={0: [1, 3]}, ffn={1: [3]}, hidden=[2])

    def mixed(chunks, fill: bool):
        params = [p for c in chunks for p in c.parameters()]
        mains = [p.detach().clone() for p in params]
        inner = torch.optim.AdamW(mains)
        if fill:
            for i, m in enumerate(mains):
                inner.state[m] = {"exp_avg": torch.full_like(m, i) + torch.randn_like(m),
                                  "exp_avg_sq": torch.rand_like(m), "step": torch.tensor(3.0)}
        return SimpleNamespace(optimizer=inner, float16_groups=[params],
                               fp32_from_float16_groups=[mains], fp32_from_fp32_groups=[[]])

    old = build_model_chunks(ARCH, options())
    old_opt = mixed(old, True)
    H = torch.eye(128) + 0.1
    new = prune_model(old, plan, ARCH, options(), compensation={(1, "linear_fc2"): H})
    new_opt = mixed(new, False)
    for m in new_opt.fp32_from_float16_groups[0]:
        m.data.zero_()
    slice_optimizer_state(old_opt, old, new_opt, new, plan, ARCH)
    old_main = {id(p): m for p, m in zip(old_opt.float16_groups[0], old_opt.fp32_from_float16_groups[0])}
    new_main = {id(p): m for p, m in zip(new_opt.float16_groups[0], new_opt.fp32_from_float16_groups[0])}
    for s in param_slices(old, new, plan, ARCH):
        a, b = old_main[id(s.old)], new_main[id(s.new)]
        if s.name == "decoder.layers.1.mlp.linear_fc2.weight":
            assert torch.equal(b, s.new.detach())  # compensated: starts from the new weight
            assert not torch.equal(b, s.take(a))
        else:
            assert torch.equal(b, s.take(a)), s.name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new_opt.optimizer.state[b][key], s.take(old_opt.optimizer.state[a][key]))

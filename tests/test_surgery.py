"""Surgery in one process (TP1 PP1): mask equivalence, shapes, optimizer moments, training on."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

from efficientllm.model import build_model_chunks
from efficientllm.pruning.compensation import obs_remove_columns
from efficientllm.pruning.layout import complement
from efficientllm.pruning.megatron.groups import as_chunks
from efficientllm.pruning.megatron.optimizer_state import (
    leaf_optimizers,
    main_params,
    master_weights,
    slice_optimizer_state,
)
from efficientllm.pruning.megatron.surgery import compensated_inputs, mask_model, param_slices, prune_model
from efficientllm.pruning.plan import Plan
from tests.distributed.workers.surgery import ARCH, batches, logits, options, train_step, training

# At TP1 a KV group may go whole (layer 1 loses group 1 = heads 2, 3).
HEAD_FFN = Plan(heads={0: [1, 3], 1: [2, 3], 3: [0, 2]}, ffn={0: [0, 5, 77], 2: [127], 3: list(range(0, 128, 2))})
WITH_LAYER = Plan(heads={0: [1, 3]}, ffn={1: [3]}, layers=[2])


def _params(chunks) -> int:
    return sum(p.numel() for c in as_chunks(chunks) for p in c.parameters())


@pytest.mark.parametrize("plan", [HEAD_FFN, WITH_LAYER], ids=["heads+ffn", "with-layer"])
def test_pruned_model_equals_masked_model(single_rank, plan):
    data = batches(num=1)
    old = build_model_chunks(ARCH, options())
    masked = build_model_chunks(ARCH, options())
    mask_model(masked, plan, ARCH)
    pruned = prune_model(old, plan, ARCH, options()).chunks
    new_arch = plan.apply(ARCH)
    assert _params(pruned) == new_arch.num_parameters()
    torch.testing.assert_close(logits(pruned, data), logits(masked, data), rtol=1e-5, atol=1e-5)
    # the mask matters: the unmasked model differs
    assert not torch.allclose(logits(old, data), logits(masked, data), atol=1e-3)


def test_hidden_removal_shapes_and_slices(single_rank):
    plan = Plan(hidden=[0, 7, 63], heads={0: [1, 3]}, ffn={1: [3, 4]})
    old = build_model_chunks(ARCH, options())
    new = prune_model(old, plan, ARCH, options(), norm_scales={}).chunks
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
    new = prune_model(old, plan, ARCH, options(), compensation={(0, "linear_fc2"): H_fc2, (1, "linear_proj"): H_proj}).chunks
    fc2 = old[0].decoder.layers[0].mlp.linear_fc2.weight
    # surgery forms only the removed rows of H^-1; against OBS through the full inverse:
    expected = obs_remove_columns(fc2, H_fc2, torch.tensor([1, 2])).weight
    torch.testing.assert_close(new[0].decoder.layers[0].mlp.linear_fc2.weight, expected, rtol=1e-6, atol=1e-7)
    proj = old[0].decoder.layers[1].self_attention.linear_proj.weight
    expected = obs_remove_columns(proj, H_proj, torch.cat([torch.arange(0, 16), torch.arange(32, 48)])).weight
    torch.testing.assert_close(new[0].decoder.layers[1].self_attention.linear_proj.weight, expected, rtol=1e-6, atol=1e-7)
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
    pruned = prune_model(model, plan, ARCH, options())
    new_model, new_optimizer = build(pruned.chunks)
    moved = slice_optimizer_state(optimizer, new_optimizer, pruned)
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


def test_an_optimizer_is_recognised_by_type_not_by_name(single_rank):
    class DistributedOptimizer:  # named like megatron's, but not it
        optimizer = None

    with pytest.raises(NotImplementedError, match="does not know"):
        leaf_optimizers(DistributedOptimizer())


def test_plan_out_of_range_fails_before_building(single_rank):
    old = build_model_chunks(ARCH, options())
    with pytest.raises(ValueError):
        prune_model(old, Plan(ffn={0: [500]}), ARCH, options())


def _main_and_moments(optimizer, param) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A model param's fp32 main param and Adam moments, by megatron's own accessors."""
    leaf = leaf_optimizers(optimizer)[0]
    if isinstance(leaf, DistributedOptimizer):  # one DP rank: it owns every whole param
        tensors = leaf._get_main_param_and_optimizer_states(param)
        return tensors["param"].view(param.shape), {k: tensors[k].view(param.shape) for k in ("exp_avg", "exp_avg_sq")}
    inner, main = main_params(optimizer)[id(param)]
    return main, {k: inner.state[main][k] for k in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("distributed", [False, True], ids=["Float16Optimizer", "DistributedOptimizer"])
def test_bf16_masters_are_compensated_in_fp32_then_rounded_into_the_model(single_rank, distributed):
    """megatron's real bf16 optimizers (fp32 main params; the distributed one at DP1): OBS and
    the norm rescale run on the fp32 masters, the new main params are those exact values (not
    re-rounded from the bf16 weights), the model holds their bf16 rounding, moments are sliced."""
    plan = Plan(heads={0: [1, 3]}, ffn={1: [3]}, hidden=[2, 9])
    bf16 = options(bf16=True)
    build = training(bf16=True, distributed=distributed)
    model, optimizer = build(build_model_chunks(ARCH, bf16))
    for _ in range(2):  # the masters move off the bf16 grid
        train_step(model, optimizer, batches())
    expected_type = DistributedOptimizer if distributed else Float16OptimizerWithFloat16Params
    assert isinstance(leaf_optimizers(optimizer)[0], expected_type)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    compensation = {(1, "linear_fc1"): x.T @ x, (None, "output_layer"): x.T @ x}
    pruned = prune_model(model, plan, ARCH, bf16, compensation, norm_scales={(None, "final_layernorm"): 1.25},
                         masters=master_weights(optimizer, model))
    new_model, new_optimizer = build(pruned.chunks)
    slice_optimizer_state(optimizer, new_optimizer, pruned)
    checked = set()
    for s in param_slices(model, new_model, plan, ARCH):
        old_master, old_moments = _main_and_moments(optimizer, s.old)
        main, moments = _main_and_moments(new_optimizer, s.new)
        if s.key in compensation:  # against OBS through the full inverse
            expected = obs_remove_columns(old_master, compensation[s.key], complement(64, s.cols)).weight
            expected = expected if s.rows is None else expected[s.rows]
            torch.testing.assert_close(main, expected, rtol=1e-5, atol=1e-7)
            assert not torch.equal(main, s.take(old_master)), f"{s.name}: not compensated"
        elif s.key == (None, "final_layernorm"):
            assert torch.equal(main, s.take(old_master) * 1.25), s.name
        else:
            assert torch.equal(main, s.take(old_master)), s.name
        assert main.dtype == torch.float32
        assert torch.equal(s.new.detach(), main.to(torch.bfloat16)), s.name
        assert not torch.equal(main, s.new.detach().float()), f"{s.name}: the master was re-rounded to bf16"
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[key], s.take(old_moments[key])), (s.name, key)
        checked.add(s.key)
    assert set(compensation) | {(None, "final_layernorm")} <= checked
    assert math.isfinite(train_step(new_model, new_optimizer, batches()))


def test_the_pruned_model_is_built_without_init_and_keeps_megatrons_tensor_parallel_attributes(single_rank):
    """megatron sets tensor_model_parallel / partition_dim / partition_stride in its weight
    init, which the rebuild skips (every value is copied in): surgery copies them over, so
    megatron's grad-norm and checkpoint code see the same parameters as before."""
    old = build_model_chunks(ARCH, options())
    bare = build_model_chunks(ARCH, options(), initialize=False)
    assert not any(hasattr(p, "tensor_model_parallel") for p in bare[0].parameters()), "megatron's init skipped"
    pruned = prune_model(old, HEAD_FFN.union(Plan(hidden=[4])), ARCH, options())
    attributes = ("tensor_model_parallel", "partition_dim", "partition_stride")
    for s in pruned.slices:
        assert [getattr(s.new, a, None) for a in attributes] == [getattr(s.old, a, None) for a in attributes], s.name
    assert sum(bool(getattr(s.new, "tensor_model_parallel", False)) for s in pruned.slices) >= 4 * len(ARCH.layers)


def test_the_compensated_inputs_are_the_kept_columns_of_each_consumer_the_plan_cuts_into():
    plan = Plan(heads={0: [1]}, ffn={2: [5]}, layers=[3])
    inputs = compensated_inputs(plan, ARCH, tp_rank=0, tp_size=1)
    assert set(inputs) == {(0, "linear_proj"), (2, "linear_fc2")}
    assert inputs[(0, "linear_proj")].tolist() == [*range(0, 16), *range(32, 64)]  # head 1: columns 16-31
    assert inputs[(2, "linear_fc2")].tolist() == [c for c in range(128) if c != 5]
    with_hidden = compensated_inputs(plan.union(Plan(hidden=[1])), ARCH, tp_rank=0, tp_size=1)
    kept = [0, 1, 2]  # layer 3 goes whole: nothing of it is compensated
    assert set(with_hidden) == ({(0, "linear_proj"), (2, "linear_fc2"), (None, "output_layer")}
                                | {(l, n) for l in kept for n in ("linear_qkv", "linear_fc1")})
    assert with_hidden[(None, "output_layer")].tolist() == [c for c in range(64) if c != 1]

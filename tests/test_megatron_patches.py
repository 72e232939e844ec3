"""Each patch does what megatron-core needs here, and each guard fails if megatron-core changes
under the patch (so a version bump is noticed, not silently mis-patched)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json

import pytest
import torch

import megatron_patches
from megatron_patches import cpu
from megatron_patches.heterogeneous import PerLayerHeadsTransformerConfig
from megatron_patches.norm import SequenceParallelTorchNorm


def test_apply_is_idempotent_and_cpu_only_where_cuda_is_missing():
    first = megatron_patches.apply()
    assert megatron_patches.apply() == first
    assert ("cpu" in first) == (not torch.cuda.is_available())


def test_apply_refuses_an_unsupported_megatron_core(monkeypatch):
    from packaging.version import Version

    monkeypatch.setattr(megatron_patches, "megatron_core_version", lambda: Version("0.18.0"))
    with pytest.raises(megatron_patches.UnsupportedMegatronVersion, match="0.18.0"):
        megatron_patches.apply()


def test_pinned_megatron_core_is_inside_the_supported_range():
    low, high = megatron_patches.SUPPORTED_MEGATRON_CORE
    assert low <= megatron_patches.megatron_core_version() < high


@pytest.mark.parametrize("module", cpu.MODULES_WITH_CUDA_LITERALS)
def test_patched_modules_still_hard_code_cuda(module):
    # If megatron-core stops hard-coding CUDA in a module, its patch is dead weight: drop it.
    source = inspect.getsource(importlib.import_module(module))
    assert 'device="cuda"' in source or "device='cuda'" in source


def test_rng_tracker_forks_on_the_cpu_generator(single_rank):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    outside = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the outer RNG state"
    with tracker.fork():
        again = torch.rand(4)
    assert not torch.equal(inside, again), "the tracked stream must advance between forks"


def test_factories_in_patched_modules_put_cuda_tensors_on_the_cpu(single_rank):
    from megatron.core.transformer import utils

    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.shape == (4, 4)


def test_grad_clipping_accepts_cpu_grads(single_rank):
    from megatron.core.optimizer import optimizer

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((3,), 0.5), rtol=1e-4)


def _block_configs(heads: list[int], groups: list[int], ffn: list[int]) -> str:
    blocks = [
        {"attention": {"no_op": False, "replace_with_linear": False, "num_query_groups": g,
                       "num_attention_heads": h},
         "ffn": {"no_op": False, "replace_with_linear": False, "ffn_hidden_size": f}}
        for h, g, f in zip(heads, groups, ffn)
    ]
    return json.dumps({"block_configs": blocks})


def _config(cls, **extra):
    return cls(
        heterogeneous_layers_config_encoded_json=_block_configs([4, 2], [2, 1], [64, 32]),
        num_layers=2, hidden_size=32, num_attention_heads=4, kv_channels=8,
        use_cpu_initialization=True, **extra,
    )


def test_megatron_heterogeneous_config_still_ignores_per_layer_heads():
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    layer = _config(HeterogeneousTransformerConfig).get_config_for_layer(2)
    assert layer.num_query_groups == 1 and layer.num_attention_heads == 4


def test_per_layer_heads_config_applies_each_layers_heads():
    config = _config(PerLayerHeadsTransformerConfig)
    assert config.get_config_for_layer(1).num_attention_heads == 4
    second = config.get_config_for_layer(2)
    assert (second.num_attention_heads, second.num_query_groups, second.ffn_hidden_size) == (2, 1, 32)


def test_megatron_torch_norm_still_refuses_sequence_parallel():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               normalization="RMSNorm", use_cpu_initialization=True)
    config = dataclasses.replace(config, sequence_parallel=False)
    object.__setattr__(config, "sequence_parallel", True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config, 8)
    norm = SequenceParallelTorchNorm(config, 8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def test_megatron_fp16_optimizer_still_accepts_only_cuda_type_names():
    # The CPU patch reports torch.cuda.* names inside its constructor so bf16 trains on the CPU.
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    source = inspect.getsource(Float16OptimizerWithFloat16Params.__init__.__wrapped__)
    assert "torch.cuda.BFloat16Tensor" in source

"""A torch RMSNorm/LayerNorm that works under sequence parallelism without apex or TE.

Written for megatron-core 0.16.x, whose `WrappedTorchNorm` refuses `sequence_parallel=True`.
Under sequence parallelism each TP rank normalises its own slice of the sequence with the same
(replicated) weight, so the weight's gradient is a partial sum: marking the parameter
`sequence_parallel` makes megatron's DDP/finalize step all-reduce it over TP, as it does for
the TE/apex norms.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelTorchNorm:
    """Used in layer specs in place of `WrappedTorchNorm`; same constructor signature."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs) -> torch.nn.Module:
        local_config = dataclasses.replace(config, sequence_parallel=False) if config.sequence_parallel else config
        norm = WrappedTorchNorm(local_config, hidden_size, eps=eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

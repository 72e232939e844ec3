"""The log-likelihood backend for our megatron-core GPT model, at any TP/PP.

It runs on model chunks: built from a checkpoint's Architecture and loaded with its weights, or
a run's live chunks during training. Batches go through megatron's own pipeline schedule
(forward only); the last stage asks GPTModel for the per-token loss of the targets, which
megatron computes vocab-parallel across TP without gathering the logits.

Work is spread over data-parallel replicas (whole schedule calls, round robin). Each request's
sum is written by exactly one rank (TP rank 0 of the last stage of the replica that ran it),
so one all-reduce of the float64 totals gives every rank the same numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config, unwrap_model

from efficientllm import distributed
from efficientllm.architecture import Architecture
from efficientllm.evaluation.lm import (
    Batch,
    EvalTokenizer,
    Packed,
    TokenPair,
    input_length,
    pack,
    plan_batches,
    regroup,
    tokens_per_forward,
)
from efficientllm.training import checkpoint


@dataclass(frozen=True)
class CheckpointModel:
    """A checkpoint resolved and checked against an evaluation layout, before anything is built."""

    path: Path  # the iter_N directory
    meta: dict[str, Any]
    arch: Architecture
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int


def resolve_checkpoint(path: str | Path, tensor_model_parallel_size: int = 1,
                       pipeline_model_parallel_size: int = 1) -> CheckpointModel:
    """The newest complete checkpoint under `path` (or `path` itself), checked to fit TP x PP."""
    from efficientllm.config import config_from_dict

    found = checkpoint.find_checkpoint(path)
    if found is None:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {path}; give a save directory, an iter_N directory or a Hugging Face "
            f"directory (with config.json)")
    meta = checkpoint.verify(found)
    config = config_from_dict(meta["config"])
    config.parallel = dataclasses.replace(
        config.parallel, tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size, virtual_pipeline_model_parallel_size=None)
    arch = checkpoint.architecture_for_load(meta, config, found)
    return CheckpointModel(found, meta, arch, tensor_model_parallel_size, pipeline_model_parallel_size)


def _model_options(resolved: CheckpointModel):
    from efficientllm.config import config_from_dict
    from efficientllm.model import model_options

    # The spec the checkpoint was written with (it may change after the pruning phase).
    options = model_options(config_from_dict(resolved.meta["config"]), resolved.meta["iteration"])
    on_gpu = torch.cuda.is_available()  # a CPU evaluates in fp32 with megatron's local layers
    return dataclasses.replace(
        options,
        tensor_model_parallel_size=resolved.tensor_model_parallel_size,
        pipeline_model_parallel_size=resolved.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
        bf16=options.bf16 and on_gpu, transformer_engine=options.transformer_engine and on_gpu,
    )


class MegatronLM:
    """`chunks`: this rank's GPTModel chunks (bare or DDP-wrapped) of a formed TP/PP layout."""

    def __init__(self, chunks: list[torch.nn.Module], tokenizer: EvalTokenizer, max_length: int,
                 batch_size: int = 16) -> None:
        self.chunks = chunks
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        config = get_model_config(chunks[0])
        # Sequence parallelism splits the sequence over TP; a pipeline keeps a few micro-batches
        # in flight per schedule call so that its stages overlap.
        self._length_multiple = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
        self._batches_per_call = 1 if config.pipeline_model_parallel_size == 1 else 2 * config.pipeline_model_parallel_size

    @classmethod
    def from_checkpoint(cls, path: str | Path | CheckpointModel, *, tokenizer: str | Path | None = None,
                        max_length: int | None = None, batch_size: int = 16) -> "MegatronLM":
        """Build at the formed process groups' TP/PP and load the checkpoint's weights."""
        from efficientllm.model import build_model_chunks

        resolved = path if isinstance(path, CheckpointModel) else resolve_checkpoint(
            path, parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())
        chunks = build_model_chunks(resolved.arch, _model_options(resolved))
        checkpoint.load_model_weights(chunks, resolved.path)
        return cls(chunks, checkpoint.load_tokenizer_from(tokenizer or resolved.path),
                   max_length or resolved.meta["seq_length"], batch_size)

    @torch.no_grad()
    def loglikelihoods(self, groups: Sequence[Sequence[TokenPair]]) -> list[list[float]]:
        totals = torch.zeros(sum(len(g) for g in groups), dtype=torch.float64)
        budget = tokens_per_forward(unwrap_model(self.chunks[0]).vocab_size)
        batches = plan_batches(groups, self.batch_size, self.max_length, budget)
        calls = [batches[i:i + self._batches_per_call] for i in range(0, len(batches), self._batches_per_call)]
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        writes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            for call in calls[dp_rank::dp_size]:
                sums = self._run(call)
                if writes:
                    for batch, batch_sums in zip(call, sums):
                        totals[batch.indices] = batch_sums[:len(batch.indices)].cpu()
        finally:
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)
        if dist.is_initialized():
            on_device = totals.to(distributed.device())  # NCCL reduces only GPU tensors
            dist.all_reduce(on_device)
            totals = on_device.cpu()
        return regroup(totals.tolist(), groups)

    def _run(self, call: list[Batch]) -> list[torch.Tensor]:
        """One schedule call over `call`'s batches padded to one shape; the per-row sums on the
        last stage (empty elsewhere)."""
        rows = max(len(b.pairs) for b in call)
        longest = max(input_length(p, self.max_length) for b in call for p in b.pairs)
        length = -(-longest // self._length_multiple) * self._length_multiple
        device = next(self.chunks[0].parameters()).device
        packs = [pack(b.pairs, self.max_length, rows, length).to(device) for b in call]
        sums: list[torch.Tensor] = []

        def forward_step(data_iterator, model):
            batch: Packed = next(data_iterator)
            # With labels, GPTModel returns the per-token cross entropy: -log p(target).
            output = model(batch.tokens, batch.position_ids, None, labels=batch.targets)

            def collect(per_token_loss: torch.Tensor):
                sums.append(batch.sums(-per_token_loss))
                return per_token_loss.sum() * 0.0, {}

            return output, collect

        iterators = [iter(packs) for _ in self.chunks]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(packs), seq_length=length, micro_batch_size=rows, forward_only=True,
        )
        return sums

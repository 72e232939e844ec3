"""Megatron DDP wrapping, `get_megatron_optimizer` and the LR schedule, from the run config."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from efficientllm.config import ParallelConfig, TrainingConfig


def wrap_ddp(chunks: list[GPTModel], parallel: ParallelConfig) -> list[DistributedDataParallel]:
    """Wrap model chunks in megatron DDP and hook its grad sync into the pipeline schedules."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk gets buckets that overlap with the backward pass.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model


def build_optimizer(
    model: list[DistributedDataParallel], training: TrainingConfig, parallel: ParallelConfig
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=training.bf16,
        params_dtype=model[0].config.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters * training.global_batch_size,
        lr_decay_steps=training.train_iters * training.global_batch_size,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters * training.global_batch_size,
        wd_incr_style="constant",
    )
    return optimizer, scheduler

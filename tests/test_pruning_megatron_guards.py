"""The one private megatron-core call pruning makes still does what optimizer surgery needs."""

from __future__ import annotations

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from efficientllm.config import ParallelConfig, TrainingConfig
from efficientllm.model import build_model_chunks
from efficientllm.pruning.megatron.optimizer_state import leaf_optimizers
from efficientllm.training.optimizer import build_optimizer, wrap_ddp
from megatron_patches.distrib_optimizer import owned_param_range
from tests.distributed.workers.surgery import ARCH, options


def test_the_distributed_optimizers_owned_range_covers_each_param_at_one_data_parallel_rank(single_rank):
    parallel = ParallelConfig(use_distributed_optimizer=True)
    model = wrap_ddp(build_model_chunks(ARCH, options()), parallel)
    optimizer, _ = build_optimizer(model, TrainingConfig(lr_warmup_iters=0), parallel)
    leaves = leaf_optimizers(optimizer)
    assert leaves and all(isinstance(leaf, DistributedOptimizer) for leaf in leaves)
    params = [p for leaf in leaves for p in leaf.model_param_group_index_map]
    assert len(params) == sum(1 for _ in model[0].parameters())
    for leaf in leaves:
        for p in leaf.model_param_group_index_map:
            r = owned_param_range(leaf, p)
            assert (r.start, r.end) == (0, p.numel())  # one DP rank owns all of it

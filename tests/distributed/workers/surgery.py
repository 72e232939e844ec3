"""Worker for the multi-rank surgery test, and the helpers the in-process test shares.

Usage: python tests/distributed/workers/surgery.py OUT_DIR TP PP [VP]
Builds the test model at this layout, prunes it by PLAN, and checks on every rank:
the pruned model's logits equal the masked unpruned model's; after two training steps, optimizer
surgery keeps every surviving moment bit-identical; one step after surgery has a finite loss.
Rank 0 writes OUT_DIR/result.pt: gathered logits (masked, pruned), losses, the new Architecture.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from efficientllm.architecture import Architecture
from efficientllm.config import ParallelConfig, TrainingConfig
from efficientllm.model import ModelOptions
from efficientllm.pruning.plan import Plan

SEQ, MICRO, NUM_MICRO = 32, 2, 2

ARCH = Architecture.uniform(
    hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=128, vocab_size=512,
)
# Balanced at TP=2 (one KV group per rank): layers 0 and 2 lose one head of each KV group; ffn
# channels go in equal numbers from each rank's half.
PLAN = Plan(
    heads={0: [1, 3], 2: [0, 2]},
    ffn={0: [0, 5, 64, 100], 1: [63, 127], 3: [10, 11, 70, 71]},
)


def options(tp: int = 1, pp: int = 1, vp: int | None = None, bf16: bool = False) -> ModelOptions:
    return ModelOptions(seq_length=SEQ, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                        virtual_pipeline_model_parallel_size=vp, bf16=bf16)


def batches(seed: int = 0, num: int = NUM_MICRO) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, ARCH.vocab_size, (MICRO, SEQ + 1), generator=g)
        out.append({
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ).contiguous(),
            "loss_mask": torch.ones(MICRO, SEQ),
        })
    return out


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _logits_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)

    def loss_func(output_tensor):
        return output_tensor.sum() * 0.0, {"logits": _gather_vocab(output_tensor.detach())}

    return output, loss_func


def _loss_func(loss_mask, output_tensor):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _loss_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _run(chunks, step_func, data, forward_only: bool):
    iters = [iter(data) for _ in chunks] if len(chunks) > 1 else iter(data)
    return get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(data),
        seq_length=SEQ, micro_batch_size=MICRO, forward_only=forward_only,
    )


def _to_all(value):
    """Broadcast a last-stage tensor to every rank (from the last stage's first rank)."""
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    obj = [value]
    dist.broadcast_object_list(obj, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return obj[0]


@torch.no_grad()
def logits(chunks, data) -> torch.Tensor | None:
    """Full-vocab logits [micro-batches, b, s, v] on every rank."""
    for c in chunks:
        c.eval()
    out = _run(chunks, _logits_step, data, forward_only=True)
    for c in chunks:
        c.train()
    value = torch.stack([o["logits"] for o in out]) if out else None
    return _to_all(value)


def train_step(model, optimizer, data) -> float:
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = _run(model, _loss_step, data, forward_only=False)
    ok, _, _ = optimizer.step()
    assert ok
    loss = torch.stack([o["lm loss"] for o in out]).mean().item() if out else None
    return _to_all(loss)


def training(tp: int = 1, pp: int = 1, vp: int | None = None, bf16: bool = False, distributed: bool = False):
    from efficientllm.training.optimizer import build_optimizer, wrap_ddp

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vp, use_distributed_optimizer=distributed)
    cfg = TrainingConfig(lr=1e-3, min_lr=1e-3, lr_warmup_iters=0, lr_decay_style="constant",
                         global_batch_size=MICRO * NUM_MICRO, micro_batch_size=MICRO,
                         train_iters=100, weight_decay=0.1, bf16=bf16)

    def build(chunks):
        model = wrap_ddp(chunks, parallel)
        optimizer, _ = build_optimizer(model, cfg, parallel)
        return model, optimizer

    return build


def moments_identical(old_optimizer, old_model, new_optimizer, new_model, plan, arch) -> int:
    """Check every new param's Adam state is exactly the old state's surviving slice."""
    from efficientllm.pruning.megatron.optimizer_state import main_params
    from efficientllm.pruning.megatron.surgery import param_slices

    old_main, new_main = main_params(old_optimizer), main_params(new_optimizer)
    checked = 0
    for s in param_slices(old_model, new_model, plan, arch):
        old_inner, old_p = old_main[id(s.old)]
        new_inner, new_p = new_main[id(s.new)]
        old_state, new_state = old_inner.state[old_p], new_inner.state[new_p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new_state[key], s.take(old_state[key])), (s.name, key)
            assert new_state[key].shape == s.new.shape
        assert float(new_state["step"]) == float(old_state["step"])
        checked += 1
    return checked


def main() -> None:
    from efficientllm import distributed
    from efficientllm.model import build_model_chunks
    from efficientllm.pruning.megatron.optimizer_state import slice_optimizer_state
    from efficientllm.pruning.megatron.surgery import mask_model, prune_model

    out_dir = Path(sys.argv[1])
    tp, pp = int(sys.argv[2]), int(sys.argv[3])
    vp = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "none" else None
    launch = distributed.read_launch_env()
    distributed.initialize(launch, tp, pp, vp, seed=1234)
    try:
        opts = options(tp, pp, vp)
        new_arch = PLAN.validate(ARCH, tp)
        data = batches()
        old = build_model_chunks(ARCH, opts)
        masked = build_model_chunks(ARCH, opts)  # the same seed: the same weights
        mask_model(masked, PLAN, ARCH)
        pruned = prune_model(old, PLAN, ARCH, opts).chunks
        masked_logits, pruned_logits = logits(masked, data), logits(pruned, data)
        torch.testing.assert_close(pruned_logits, masked_logits, rtol=1e-5, atol=1e-5)

        build = training(tp, pp, vp)
        model, optimizer = build(old)
        losses = [train_step(model, optimizer, data) for _ in range(2)]
        pruned_model = prune_model(model, PLAN, ARCH, opts)
        new_model, new_optimizer = build(pruned_model.chunks)
        moved = slice_optimizer_state(optimizer, new_optimizer, pruned_model)
        checked = moments_identical(optimizer, model, new_optimizer, new_model, PLAN, ARCH)
        assert moved == checked == sum(1 for c in new_model for _ in c.parameters()), (moved, checked)
        after = train_step(new_model, new_optimizer, data)
        assert math.isfinite(after), after
        if launch.rank == 0:
            torch.save({"masked": masked_logits, "pruned": pruned_logits, "losses": losses,
                        "after": after, "arch": new_arch.to_dict()}, out_dir / "result.pt")
        print(f"rank {launch.rank}: ok, moved {moved}", flush=True)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()

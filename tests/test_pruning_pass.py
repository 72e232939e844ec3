"""The pruning pass inside the real trainer step, on one in-process rank: a step the optimizer
skips is not scored, the window closes after the last event, an event's record says what the
ranking saw, and OBS falling back to slicing is said in the log."""

from __future__ import annotations

import itertools
import math

import torch

from efficientllm.config import Config
from efficientllm.model import build_model_chunks
from efficientllm.pruning.megatron.surgery import prune_model
from efficientllm.pruning.plan import Plan
from efficientllm.training.pruning import PruningPass, describe_event
from tests.distributed.workers.surgery import ARCH, NUM_MICRO, batches, options


def _trainer(single_rank, tmp_path, bf16: bool = False, **prune):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    config = Config(run_dir=str(tmp_path / "run"))
    for key in ("hidden_size", "head_dim", "vocab_size"):
        setattr(config.model, key, getattr(ARCH, key))
    config.model.num_layers = ARCH.num_layers
    w = ARCH.layers[0]
    config.model.num_attention_heads, config.model.num_query_groups = w.num_attention_heads, w.num_query_groups
    config.model.ffn_hidden_size = w.ffn_hidden_size
    config.data.seq_length = 32
    t = config.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr_warmup_iters, t.bf16 = 2, 2 * NUM_MICRO, 10, 0, bf16
    config.saliency.hessian_window = 2
    for key, value in {"enabled": True, "target_ratio": 0.8, "align": 2, "min_hidden": 16, **prune}.items():
        setattr(config.prune, key, value)
    trainer = Trainer(config, single_rank)
    trainer.dp_rank, trainer.dp_size, trainer.num_microbatches = 0, 1, NUM_MICRO
    trainer.build_model(architecture_from_config(config, ARCH.vocab_size))
    trainer.pruning = PruningPass(trainer, trainer.arch)
    return trainer


def _step(trainer, data) -> dict | None:
    """What Trainer.train does around one step."""
    trainer.pruning.before_step(trainer.state.iteration + 1)
    trainer.train_step(data)
    return trainer.pruning.after_step(trainer.state.iteration)


def _stats(trainer) -> list[torch.Tensor]:
    acc = trainer.pruning.saliency
    return [v.clone() for s in acc.stats.values() for v in s.values()] + [acc.hidden_fisher.clone()]


def _with_loss_scale(trainer) -> None:
    """megatron's bf16 optimizer with a (constant) loss scale: the one that checks gradients for
    inf/nan and skips such a step (without a scaler it steps on them)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = trainer.config.training
    config = OptimizerConfig(optimizer="adam", lr=t.lr, bf16=True, loss_scale=1.0, clip_grad=t.clip_grad,
                             params_dtype=torch.bfloat16)
    trainer.optimizer = get_megatron_optimizer(config, trainer.model)


def test_a_step_the_optimizer_skips_for_non_finite_gradients_is_not_scored(single_rank, tmp_path):
    trainer = _trainer(single_rank, tmp_path, bf16=True, start_step=3, end_step=3)
    _with_loss_scale(trainer)
    good = itertools.cycle(batches(seed=0))
    poisoned = batches(seed=1)
    for batch in poisoned:
        batch["loss_mask"][0, 0] = math.inf  # the loss, and so every gradient, is not finite
    assert _step(trainer, good) is None
    before, weights = _stats(trainer), [p.detach().clone() for p in trainer.model[0].parameters()]
    assert _step(trainer, iter(poisoned)) is None
    assert all(torch.equal(p, q) for p, q in zip(trainer.model[0].parameters(), weights)), "the optimizer skipped it"
    assert trainer.pruning.saliency.steps == 1
    assert all(torch.equal(a, b) for a, b in zip(_stats(trainer), before)), "the skipped step left no trace"
    event = _step(trainer, good)  # scored, and the event ranks finite scores
    assert trainer.pruning.saliency.steps == 2 and event is not None
    assert event["params_after"] < event["params_before"]


def _pre_hooks(trainer) -> int:
    return sum(len(m._forward_pre_hooks) for chunk in trainer.model for m in chunk.modules())


def test_the_window_is_closed_after_the_last_event_even_when_it_removes_nothing(single_rank, tmp_path):
    trainer = _trainer(single_rank, tmp_path, start_step=3, end_step=5, interval=2)
    source = trainer.arch
    small = Plan(ffn={l: range(0, 120) for l in range(ARCH.num_layers)}).apply(source)
    assert small.num_parameters() < trainer.pruning.schedule.target_params
    trainer.build_model(small)  # already below the target (as if resumed): no event removes anything
    trainer.pruning = PruningPass(trainer, source)
    data, outside = itertools.cycle(batches()), _pre_hooks(trainer)
    opened = []
    for _ in range(7):
        assert _step(trainer, data) is None
        opened.append(_pre_hooks(trainer) > outside)
    # open for the 2 batches before events 3 and 5, closed by each event, gone after the last
    assert opened == [False, True, False, True, False, False, False]
    assert trainer.pruning.window is None


def test_an_event_records_each_kinds_cheapest_saliency_per_parameter(single_rank, tmp_path):
    trainer = _trainer(single_rank, tmp_path, start_step=2, end_step=2)
    data = itertools.cycle(batches())
    _step(trainer, data)
    event = _step(trainer, data)
    assert set(event["score_per_param"]) == {"head", "ffn", "hidden"}
    assert all(0 < v < math.inf for v in event["score_per_param"].values())
    assert 0 < event["unit_bound"] and event["obs_fallbacks"] == []
    assert event["params_before"] - event["params_after"] < event["budget"] + event["unit_bound"]


def test_obs_falling_back_to_plain_slicing_is_said_in_the_events_log_line(single_rank):
    chunks = build_model_chunks(ARCH, options())
    no_data = torch.zeros(ARCH.layers[0].ffn_hidden_size, ARCH.layers[0].ffn_hidden_size)
    pruned = prune_model(chunks, Plan(ffn={0: [3, 4]}), ARCH, options(), {(0, "linear_fc2"): no_data})
    assert len(pruned.fallbacks) == 1 and "decoder.layers.0.mlp.linear_fc2" in pruned.fallbacks[0]
    record = {"removed": {"ffn": 2}, "params_before": 10, "params_after": 8, "budget": 9, "seconds": 0.1,
              "obs_fallbacks": pruned.fallbacks}
    line = describe_event(7, record)
    assert "OBS fell back to plain slicing for 1 consumer" in line and "no data" in line

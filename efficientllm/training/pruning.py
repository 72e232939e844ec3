"""Pruning events inside the training loop: the distributed structured-pruning pass.

At an event, on every rank at once: the saliency statistics are reduced into one global score
table; the plain-math selection turns the schedule's budget into a Plan; the Plan's checksum is
compared across all ranks; the consumers of removed structures are compensated (structured OBS
on the window's Hessians, each summed onto and factored by one DP rank) and, after a hidden removal, every RMSNorm weight is rescaled to keep
its expected output scale; every shard is sliced, from the fp32 masters, into a model built from
the new Architecture; the DDP buffers and optimizer are rebuilt with their state sliced the same
way; the accumulators are re-indexed. The new Architecture is the only record of the new shapes.

The budget follows the schedule (`prune.target_params` / `target_ratio`), or one event prunes to
`prune.target_architecture` (`selection.select_architecture`).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from efficientllm.architecture import Architecture
from efficientllm.config import Config, ConfigError
from efficientllm.model import ModelOptions
from efficientllm.pruning.layout import kept_hidden
from efficientllm.pruning.megatron import sync
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.obs import consumer_updates, residual_factors
from efficientllm.pruning.megatron.optimizer_state import master_weights, slice_optimizer_state
from efficientllm.pruning.megatron.saliency import SaliencyAccumulator
from efficientllm.pruning.megatron.surgery import prune_model
from efficientllm.pruning.plan import Plan, pruning_ratios
from efficientllm.pruning.schedule import PruningSchedule
from efficientllm.pruning.selection import (
    Constraints,
    check_architecture_reachable,
    check_reachable,
    scale_scores,
    select,
    select_architecture,
)
from efficientllm.pruning.targets import target_from_spec


class TrainerView(Protocol):
    """What the pass needs of the trainer."""

    config: Config
    arch: Architecture
    model: list
    optimizer: Any
    options: ModelOptions

    def install_model(self, arch: Architecture, chunks: list) -> None: ...


def constraints_of(config: Config) -> Constraints:
    """What every selection of the run keeps buildable (the prune section and the TP size)."""
    pr = config.prune
    return Constraints(
        tensor_parallel_size=config.parallel.tensor_model_parallel_size,
        align=pr.align,
        min_heads_per_layer=pr.min_heads_per_layer,
        min_query_groups=pr.min_query_groups,
        min_ffn_per_layer=pr.min_ffn_per_layer,
        min_hidden=pr.min_hidden,
        max_ratio=pr.max_ratio,
        kinds=tuple(pr.kinds),
    )


def target_architecture(config: Config, source: Architecture) -> Architecture | None:
    """`prune.target_architecture` applied to `source` (None when the run follows a parameter
    budget); ConfigError naming the width the selection cannot reach. The vocabulary does not
    matter, so the trainer checks this before the tokenizer is known."""
    spec = config.prune.target_architecture
    if not config.prune.enabled or spec is None:
        return None
    try:
        target = target_from_spec(source, spec)
        check_architecture_reachable(source, target, constraints_of(config))
    except ValueError as err:
        raise ConfigError(f"prune.target_architecture: {err}") from None
    return target


class PruningPass:
    """Owns the schedule, the accumulators and the window's statistics; the trainer calls it
    around every step."""

    def __init__(self, trainer: TrainerView, source: Architecture):
        self.trainer = trainer
        c = trainer.config
        pr = c.prune
        self.source = source
        source_params = self.source.num_parameters()
        self.constraints = constraints_of(c)
        self.target_architecture = target_architecture(c, source)
        if self.target_architecture is not None:
            target = self.target_architecture.num_parameters()
        else:
            target = pr.target_params if pr.target_params is not None else round(pr.target_ratio * source_params)
        if target >= source_params:
            raise ConfigError(
                f"prune target {target:,} parameters is not below the source model's {source_params:,}"
            )
        try:
            if self.target_architecture is None:
                check_reachable(self.source, target, self.constraints)
            else:  # from the model the run starts with (a checkpoint may already be pruned)
                check_architecture_reachable(trainer.arch, self.target_architecture, self.constraints)
            self.schedule = PruningSchedule(source_params, target, pr.start_step, pr.end_step, pr.interval)
        except ValueError as err:
            raise ConfigError(f"prune: {err}") from None
        self.normalisation = pr.kind_weights or pr.normalisation
        self.use_obs = pr.compensation == "obs"
        self.correct_norms = pr.hidden_rms_correction and "hidden" in pr.kinds
        self.activation_saliency = c.saliency.criterion == "activation"
        self.plans: list[dict[str, Any]] = []
        self._attach()

    def _attach(self) -> None:
        t = self.trainer
        self.saliency = SaliencyAccumulator(t.model, t.arch, t.config.saliency, hidden_sum=sync.sum_over_model_parallel)
        self.window = self._new_window()

    def _new_window(self) -> HessianCollector | None:
        if not (self.use_obs or self.correct_norms or self.activation_saliency):
            return None
        return HessianCollector(self.trainer.model, self.trainer.arch, hessians=self.use_obs,
                                energies=self.correct_norms, activations=self.activation_saliency)

    # ----- called by the trainer ---------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Open the window for the batches just before the next event."""
        if self.window is None or self.window.is_open:
            return
        span = self.trainer.config.saliency.hessian_window
        if any(self.schedule.is_event(s) for s in range(step, step + span)):
            self.window.open_window()

    def after_backward(self, step: int) -> None:
        """Observe step `step`'s gradients (before the optimizer changes the weights); after
        the last event the continued pretraining pays nothing for statistics."""
        if step > self.schedule.end_step:
            return
        if not self.activation_saliency and sync.grads_are_reduce_scattered(self.trainer.model):
            sync.complete_reduce_scattered_grads(self.trainer.model)
        self.saliency.observe()

    def after_optimizer_step(self, step: int, update_successful: bool) -> None:
        """Fold the observed step in, unless the optimizer skipped it (non-finite gradients)."""
        if step > self.schedule.end_step:
            return
        if update_successful:
            self.saliency.commit()
        else:
            self.saliency.discard()

    def after_step(self, step: int) -> dict[str, Any] | None:
        """Run the event scheduled at this step, if any; returns its log record. Every event
        closes the window, also one with nothing to remove; the last one removes it."""
        if not self.schedule.is_event(step):
            return None
        arch = self.trainer.arch
        budget = arch.num_parameters() - self.schedule.budget(step)
        record = self._event(step, arch, budget) if budget > 0 else None
        if record is None and self.window is not None:
            self.window.close_window()
            self.window.reset()
        if step >= self.schedule.end_step and self.window is not None:
            self.window.close_window()  # nothing reads statistics after the last event
            self.window = None
        return record

    # ----- the event ---------------------------------------------------------------------
    def _event(self, step: int, arch: Architecture, budget: int) -> dict[str, Any]:
        start = time.perf_counter()
        t = self.trainer
        if self.window is not None:
            self.window.close_window()
            # The scores may read the window's activations; its Hessians wait for the Plan (or for
            # `residual_factors`, which sums them onto their owners once).
            sync.reduce_window_over_dp(self.window, hessians=False, energies=False)
        scores = sync.global_score_table(self.saliency, window=self.window)
        left = {}
        if t.config.prune.score_after_compensation:
            factors = residual_factors(self.window, self.saliency.groups, arch, t.config.prune.damping)
            scores = scale_scores(scores, factors)
            left = {kind: round(float(torch.cat(f if isinstance(f, list) else [f]).mean()), 4)
                    for kind, f in factors.items() if kind in scores}
        if self.target_architecture is not None:
            selection = select_architecture(arch, scores, self.target_architecture, self.constraints,
                                            self.normalisation)
        else:
            selection = select(arch, scores, budget, self.constraints, self.normalisation,
                               phase_target=self.schedule.target_params)
        plan = selection.plan
        sync.check_plan_identical(plan, self.saliency.hidden_fisher.device)
        compensation, norm_scales, fallbacks = self._corrections(plan, arch)
        old_model, old_optimizer = t.model, t.optimizer
        pruned = prune_model(old_model, plan, arch, t.options, compensation, t.config.prune.damping,
                             norm_scales, master_weights(old_optimizer, old_model))
        t.install_model(plan.apply(arch), pruned.chunks)
        slice_optimizer_state(old_optimizer, t.optimizer, pruned)
        self.saliency.reindex(plan, arch, t.model)
        self.window = self._new_window()
        self.plans.append({"step": step, "plan": plan.to_dict()})
        return {
            "params_before": arch.num_parameters(),
            "params_after": t.arch.num_parameters(),
            "budget": self.schedule.budget(step),
            "unit_bound": selection.unit_bound,
            "removed": plan.counts(),
            "ratio": pruning_ratios(self.source, t.arch),
            "saliency": _mean_removed_saliency(scores, plan),
            "score_per_param": dict(selection.score_per_param),
            "widths": [[l.num_attention_heads, l.num_query_groups, l.ffn_hidden_size] for l in t.arch.layers],
            "hidden": t.arch.hidden_size,
            "obs_fallbacks": fallbacks + pruned.fallbacks,
            **({"error_left_by_obs": left} if left else {}),
            "seconds": time.perf_counter() - start,
        }

    def _corrections(self, plan: Plan, arch: Architecture) -> tuple[dict, dict, list[str]]:
        """The OBS updates of the consumers the Plan compensates, each computed on one DP rank
        from the window's Hessian summed there (the rest of the window is not reduced and goes
        with it), the RMSNorm rescale factors after a hidden removal (from energies reduced over
        DP), and the consumers only sliced, with why."""
        window = self.window
        if window is None:
            return {}, {}, []
        compensation, fallbacks = {}, []
        if self.use_obs:
            compensation, fallbacks = consumer_updates(window, plan, arch, self.trainer.config.prune.damping)
        norm_scales = {}
        if plan.hidden and self.correct_norms:
            sync.reduce_window_over_dp(window, hessians=False, activations=False)
            norm_scales = window.norm_scales(arch.hidden_size, kept_hidden(arch, plan.hidden))
        return compensation, norm_scales, fallbacks

    # ----- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Replicated state: the Plans so far (the schedule position is the iteration)."""
        return {"plans": self.plans}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plans = list(state["plans"])

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's statistics: saliency of its shards and the window's, if one is open."""
        return {"saliency": self.saliency.state_dict(),
                "hessians": self.window.state_dict() if self.window is not None else None,
                "window_open": self.window is not None and self.window.is_open}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        self.saliency.load_state_dict(state["saliency"])
        if self.window is not None and state["hessians"] is not None:
            self.window.load_state_dict(state["hessians"])
            if state["window_open"]:
                self.window.open_window()

    def summary(self) -> dict[str, Any]:
        """For `efficientllm inspect`: pruning progress."""
        return {"events": len(self.plans), "source_params": self.source.num_parameters(),
                "target_params": self.schedule.target_params,
                "start_step": self.schedule.start_step, "end_step": self.schedule.end_step}


def describe_event(step: int, event: dict[str, Any]) -> str:
    """The event's log line; it says when structured OBS fell back to plain slicing."""
    removed = ", ".join(f"{n} {k}" for k, n in event["removed"].items() if n)
    line = (f"[prune] step {step} params {event['params_before']:,} -> {event['params_after']:,} "
            f"(budget {event['budget']:,}) removed {removed or 'nothing'} in {event['seconds']:.2f}s")
    fallbacks = event.get("obs_fallbacks") or []
    if fallbacks:
        line += f"; OBS fell back to plain slicing for {len(fallbacks)} consumer(s), e.g. {fallbacks[0]}"
    return line


def _mean_removed_saliency(scores: dict, plan: Plan) -> dict[str, float]:
    """Mean score of the groups an event removed, per kind (for the figure and TensorBoard)."""
    out: dict[str, float] = {}
    heads = [float(scores["head"][l][i]) for l, idx in plan.heads for i in idx]
    ffn = [float(scores["ffn"][l][i]) for l, idx in plan.ffn for i in idx]
    hidden = [float(scores["hidden"][i]) for i in plan.hidden]
    for kind, values in (("head", heads), ("ffn", ffn), ("hidden", hidden)):
        if values:
            out[kind] = sum(values) / len(values)
    return out

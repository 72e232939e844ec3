"""Pruning events inside the training loop: the distributed structured-pruning pass.

At an event, on every rank at once: the saliency statistics are reduced into one global score
table; the plain-math selection turns the schedule's budget into a Plan; the Plan's checksum is
compared across all ranks; the consumers of removed structures are compensated (structured OBS
on the local Hessians); every shard is sliced into a model built from the new Architecture; the
DDP buffers and optimizer are rebuilt with their Adam moments sliced the same way; the
accumulators are re-indexed. The new Architecture is the only record of the new shapes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from efficientllm.architecture import Architecture
from efficientllm.config import ConfigError
from efficientllm.pruning.hessian import HessianCollector
from efficientllm.pruning.plan import Plan, pruning_ratios
from efficientllm.pruning.saliency import SaliencyAccumulator
from efficientllm.pruning.schedule import PruningSchedule
from efficientllm.pruning.selection import Constraints, check_reachable, select
from efficientllm.pruning.sync import global_score_table, reduce_hessians_over_dp

if TYPE_CHECKING:
    from efficientllm.training.trainer import Trainer


class PlanMismatch(RuntimeError):
    """Ranks computed different Plans: changing the model would desynchronise them."""


def check_plan_identical(plan: Plan) -> None:
    """All-reduce the Plan's checksum as min and max; any difference is a hard error."""
    value = torch.tensor([plan.checksum(), -plan.checksum()], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    if value[0].item() != -value[1].item():
        raise PlanMismatch(
            f"pruning Plans differ across ranks (checksums {value[0].item()}..{-value[1].item()}); "
            "refusing to change the model"
        )


class PruningPass:
    """Owns the schedule, the accumulators and the Hessians; `Trainer` calls it each step."""

    def __init__(self, trainer: "Trainer", source: Architecture):
        self.trainer = trainer
        c = trainer.config
        pr = c.prune
        self.source = source
        source_params = self.source.num_parameters()
        target = pr.target_params if pr.target_params is not None else round(pr.target_ratio * source_params)
        self.constraints = Constraints(
            tensor_parallel_size=c.parallel.tensor_model_parallel_size,
            align=pr.align,
            min_heads_per_layer=pr.min_heads_per_layer,
            min_query_groups=pr.min_query_groups,
            min_ffn_per_layer=pr.min_ffn_per_layer,
            min_hidden=pr.min_hidden,
            max_ratio=pr.max_ratio,
            kinds=tuple(pr.kinds),
        )
        if target >= source_params:
            raise ConfigError(
                f"prune target {target:,} parameters is not below the source model's {source_params:,}"
            )
        try:
            check_reachable(self.source, target, self.constraints)
            self.schedule = PruningSchedule(source_params, target, pr.start_step, pr.end_step, pr.interval)
        except ValueError as err:
            raise ConfigError(f"prune: {err}") from None
        self.normalisation = pr.kind_weights or pr.normalisation
        self.use_obs = pr.compensation == "obs"
        self.plans: list[dict[str, Any]] = []
        self._attach()

    def _attach(self) -> None:
        t = self.trainer
        self.saliency = SaliencyAccumulator(t.model, t.arch, t.config.saliency)
        self.hessians = HessianCollector(t.model, t.arch) if self.use_obs else None

    # ----- called by the trainer ---------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Open the Hessian window for the batches just before the next event."""
        if self.hessians is None:
            return
        window = self.trainer.config.saliency.hessian_window
        upcoming = next((s for s in range(step, step + window) if self.schedule.is_event(s)), None)
        if upcoming is not None and not self.hessians.is_open:
            self.hessians.open_window()

    def after_backward(self, step: int) -> None:
        """Accumulate saliency from step `step`'s gradients; after the last event nothing reads
        the statistics, so the continued pretraining pays nothing for them."""
        if step <= self.schedule.end_step:
            self.saliency.update()

    def after_step(self, step: int) -> dict[str, Any] | None:
        """Run the event scheduled at this step, if any; returns its log record."""
        if not self.schedule.is_event(step):
            return None
        arch = self.trainer.arch
        budget = arch.num_parameters() - self.schedule.budget(step)
        if budget <= 0:
            return None
        return self._event(step, arch, budget)

    # ----- the event ---------------------------------------------------------------------
    def _event(self, step: int, arch: Architecture, budget: int) -> dict[str, Any]:
        from efficientllm.pruning.surgery import prune_model, slice_optimizer_state

        start = time.perf_counter()
        t = self.trainer
        scores = global_score_table(self.saliency)
        selection = select(arch, scores, budget, self.constraints, self.normalisation)
        plan = selection.plan
        check_plan_identical(plan)
        compensation = None
        if self.hessians is not None:
            self.hessians.close_window()
            reduce_hessians_over_dp(self.hessians)
            compensation = {_consumer_key(name): h for name, h in self.hessians.hessians.items()}
        old_model, old_optimizer = t.model, t.optimizer
        new_chunks = prune_model([m.module for m in old_model], plan, arch, t.options, compensation,
                                 damping=t.config.prune.damping)
        t.install_model(plan.apply(arch), new_chunks)
        slice_optimizer_state(old_optimizer, old_model, t.optimizer, t.model, plan, arch)
        self.saliency.reindex(plan, arch, t.model)
        if self.hessians is not None:
            self.hessians.remove()
            self.hessians = HessianCollector(t.model, t.arch)
        self.plans.append({"step": step, "plan": plan.to_dict()})
        removed = plan.counts()
        return {
            "params_before": arch.num_parameters(),
            "params_after": t.arch.num_parameters(),
            "budget": self.schedule.budget(step),
            "removed": removed,
            "ratio": pruning_ratios(self.source, t.arch),
            "saliency": _mean_removed_saliency(scores, plan),
            "widths": [[l.num_attention_heads, l.num_query_groups, l.ffn_hidden_size] for l in t.arch.layers],
            "hidden": t.arch.hidden_size,
            "seconds": time.perf_counter() - start,
        }

    # ----- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Replicated state: the Plans so far (the schedule position is the iteration)."""
        return {"plans": self.plans}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plans = list(state["plans"])

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's statistics: saliency of its shards and the Hessians of an open window."""
        return {"saliency": self.saliency.state_dict(),
                "hessians": self.hessians.state_dict() if self.hessians is not None else None,
                "window_open": self.hessians is not None and self.hessians.is_open}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        self.saliency.load_state_dict(state["saliency"])
        if self.hessians is not None and state["hessians"] is not None:
            self.hessians.load_state_dict(state["hessians"])
            if state["window_open"]:
                self.hessians.open_window()

    def summary(self) -> dict[str, Any]:
        """For `efficientllm inspect`: pruning progress."""
        return {"events": len(self.plans), "source_params": self.source.num_parameters(),
                "target_params": self.schedule.target_params,
                "start_step": self.schedule.start_step, "end_step": self.schedule.end_step}


def _consumer_key(name: str) -> tuple[int | None, str]:
    """HessianCollector's `layers.{l}.{consumer}` / `output_layer` → surgery's (layer, consumer)."""
    if name == "output_layer":
        return (None, "output_layer")
    _, layer, consumer = name.split(".")
    return (int(layer), consumer)


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

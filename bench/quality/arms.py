"""The arms of the quality experiment (issue 13), as run configs built from one source.

Every arm after the source gets the same token budget (`budget_steps` optimizer steps of the same
global batch), the same data (the source run's .bin/.idx and tokenizer) in the same order (one
data seed for all arms, other than the source's), and reaches the same parameter count:

- A   pruning-aware pretraining: from the source's weights, events every step between
      `prune_start` and `prune_end`, then pretraining at the found shape (the defaults), and its
      ablations (one switch each).
- B1  the architecture A found, pretrained from scratch for the same tokens.
- B2  a uniform architecture of the same size (`propose_uniform`), from scratch, same tokens.
- B3  the uniform one for the source's tokens plus A's (a reference, not an equal-token arm).
- C1  the source pruned once to the uniform target at `prune_start` with Fisher saliency (as
      LLM-Pruner does), then trained; C2 the same with activation magnitudes (as Minitron does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from efficientllm.architecture import Architecture, model_shape_fields
from efficientllm.pruning.targets import as_target_spec


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _ending_at(fraction: float):
    """The pruning phase ending at `fraction` of the budget instead of at `prune_end`."""
    def change(budget: "Budget") -> dict[str, Any]:
        return {"prune": {"end_step": max(budget.prune_start, int(budget.budget_steps * fraction))}}
    return change


_early = _ending_at(0.25)
_late = _ending_at(0.75)
_HIDDEN_QUARTER = {"prune": {"kind_weights": {"hidden": 0.25}}}


# Arm name -> the switches it flips on top of A (ablations of pruning-aware pretraining): config
# changes, or a function of the arm's Budget for the schedule.
ABLATIONS: dict[str, Any] = {
    "A-no-obs": {"prune": {"compensation": "none"}},
    "A-taylor": {"saliency": {"criterion": "taylor"}},
    "A-group-fisher": {"saliency": {"criterion": "group_fisher"}},
    "A-group-fisher-hidden-0.5": {"saliency": {"criterion": "group_fisher"}, "prune": {"kind_weights": {"hidden": 0.5}}},
    "A-group-fisher-slow-ema": {"saliency": {"criterion": "group_fisher", "ema_beta": 0.97}},
    "A-group-fisher-every-4": {"saliency": {"criterion": "group_fisher"}, "prune": {"interval": 4}},
    "A-hidden-0.1-every-4": {"prune": {"kind_weights": {"hidden": 0.1}, "interval": 4}},
    "A-hidden-0.1-every-8": {"prune": {"kind_weights": {"hidden": 0.1}, "interval": 8}},
    "A-hidden-0.1-every-8-window-8": {"prune": {"kind_weights": {"hidden": 0.1}, "interval": 8},
                                      "saliency": {"hessian_window": 8}},
    "A-group-fisher-hidden-0.5-every-4": {"saliency": {"criterion": "group_fisher"},
                                          "prune": {"kind_weights": {"hidden": 0.5}, "interval": 4}},
    "A-after-obs": {"prune": {"score_after_compensation": True}},
    "A-after-obs-every-4": {"prune": {"score_after_compensation": True, "interval": 4}},
    "A-group-fisher-after-obs-every-4": {"saliency": {"criterion": "group_fisher"},
                                         "prune": {"score_after_compensation": True, "interval": 4}},
    "A-per-group": {"prune": {"normalisation": "per_group"}},
    "A-kind-weights": _HIDDEN_QUARTER,
    "A-hidden-0.1": {"prune": {"kind_weights": {"hidden": 0.1}}},
    "A-hidden-0.05": {"prune": {"kind_weights": {"hidden": 0.05}}},
    "A-hidden-0.02": {"prune": {"kind_weights": {"hidden": 0.02}}},
    "A-no-rms-correction": {"prune": {"hidden_rms_correction": False}},
    "A-early": _early,
    "A-early-kind-weights": lambda budget: deep_update(_early(budget), _HIDDEN_QUARTER),
    "A-late-kind-weights": lambda budget: deep_update(_late(budget), _HIDDEN_QUARTER),
    "A-taylor-kind-weights": deep_update(_HIDDEN_QUARTER, {"saliency": {"criterion": "taylor"}}),
}
MAIN_ARMS = ("A", "B1", "B2", "B3", "C1", "C2")


@dataclass(frozen=True)
class Budget:
    """Steps of one arm after the source, and where its pruning happens."""

    budget_steps: int
    prune_start: int  # the saliency statistics of the first `prune_start` steps decide the first event
    prune_end: int
    finetune_lr: float  # peak LR of the arms that continue from the source's weights
    scratch_lr: float  # peak LR of the arms trained from scratch (the source's own)
    warmup: int


@dataclass
class ArmFactory:
    """Builds each arm's config from the source's config and where the source left its model."""

    source_config: dict[str, Any]  # the source run's config (with its model section)
    start: dict[str, Any]  # how an arm starts from the source: checkpoint.load + finetune, or model.from_hf
    data: dict[str, Any]  # data section shared by every arm (the source's .bin/.idx, tokenizer)
    target_params: int
    uniform: Architecture  # the uniform target of B2, B3, C1, C2
    budget: Budget
    data_seed: int
    eval_text: list[str] = field(default_factory=list)

    def _common(self, steps: int, lr: float) -> dict[str, Any]:
        b = self.budget
        config = deep_update(self.source_config, {
            "data": self.data,
            "training": {"seed": self.data_seed, "train_iters": steps, "lr": lr, "min_lr": lr / 10,
                         "lr_warmup_iters": b.warmup, "eval_text": self.eval_text},
            "checkpoint": {"save_interval": None, "keep_last": 1, "load": None, "finetune": False},
        })
        config["checkpoint"].pop("save", None)
        config["prune"] = {"enabled": False}
        return config

    def _from_source(self, prune: dict[str, Any]) -> dict[str, Any]:
        b = self.budget
        config = deep_update(self._common(b.budget_steps, b.finetune_lr), self.start)
        return deep_update(config, {"prune": {**self.source_config.get("prune", {}), "enabled": True, **prune}})

    def _from_scratch(self, arch: Architecture, steps: int) -> dict[str, Any]:
        config = self._common(steps, self.budget.scratch_lr)
        config["model"] = {**config["model"], **model_shape_fields(arch)}
        config["model"].pop("from_hf", None)
        config["model"].pop("from_hf_pad_to_tp", None)
        return config

    def a(self, ablation: str | None = None) -> dict[str, Any]:
        b = self.budget
        config = self._from_source({"target_params": self.target_params, "target_ratio": None,
                                    "start_step": b.prune_start, "end_step": b.prune_end, "interval": 1})
        if not ablation:
            return config
        change = ABLATIONS[ablation]
        return deep_update(config, change(b) if callable(change) else change)

    def c(self, criterion: str) -> dict[str, Any]:
        b = self.budget
        config = self._from_source({"target_params": None, "target_ratio": None,
                                    "target_architecture": as_target_spec(self.uniform),
                                    "start_step": b.prune_start, "end_step": b.prune_start})
        return deep_update(config, {"saliency": {"criterion": criterion}})

    def b1(self, found: Architecture) -> dict[str, Any]:
        return self._from_scratch(found, self.budget.budget_steps)

    def b2(self) -> dict[str, Any]:
        return self._from_scratch(self.uniform, self.budget.budget_steps)

    def b3(self, source_steps: int) -> dict[str, Any]:
        return self._from_scratch(self.uniform, source_steps + self.budget.budget_steps)

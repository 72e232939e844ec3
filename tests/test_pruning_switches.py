"""Every pruning switch the experiment compares, end to end through the real trainer step and
event on one in-process rank (a tiny model, one event at step 2): the event's Plan is the pure
selection's under that switch, and differs from the default's on the same statistics; the
compensation and the RMS correction switched off leave exact slices; prune-once reaches its
target architecture with either saliency (C1: Fisher, C2: Minitron's activations)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from efficientllm.pruning.compensation import removal_errors
from efficientllm.pruning.layout import complement, kept_hidden
from efficientllm.pruning.megatron.obs import residual_factors
from efficientllm.pruning.megatron.sync import global_score_table
from efficientllm.pruning.plan import Plan
from efficientllm.pruning.selection import scale_scores, select, select_architecture
from efficientllm.pruning.targets import target_from_spec
from efficientllm.training.pruning import PruningPass
from tests.distributed.workers.surgery import batches
from tests.test_pruning_pass import _trainer

EVENT = 2
TARGET = {"hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 2, "ffn_hidden_size": 64}


def _run_to_event(single_rank, tmp_path, criterion: str = "fisher", **prune):
    """A trainer whose only event is at step EVENT; returns it, the event record, the Plan, the
    Architecture, weights, window and shard groups before the event, the weights right after
    it, and every criterion's score table at it."""
    trainer = _trainer(single_rank, tmp_path, start_step=EVENT, end_step=EVENT, **prune)
    trainer.config.saliency.criterion, trainer.config.saliency.hessian_window = criterion, 1
    trainer.pruning.saliency.remove()
    trainer.pruning = PruningPass(trainer, trainer.arch)
    data = itertools.cycle(batches())
    for step in range(1, EVENT + 1):
        trainer.pruning.before_step(step)
        trainer.train_step(data)
        if step == EVENT:
            p = trainer.pruning
            with_activations = p.window is not None and p.window.activation_inputs
            tables = {c: global_score_table(p.saliency, c, window=p.window)  # one rank: reduction is a no-op
                      for c in ("fisher", "taylor", "activation") if c != "activation" or with_activations}
            weights = {n: w.detach().clone() for n, w in trainer.model[0].module.named_parameters()}
            before = (trainer.arch, weights, p.window, p.saliency.groups)
        event = trainer.pruning.after_step(step)
    after = {n: w.detach().clone() for n, w in trainer.model[0].module.named_parameters()}
    loss = trainer.train_step(data)["loss"]
    assert event is not None and math.isfinite(loss), "the event happened and training goes on"
    return trainer, event, Plan.from_dict(trainer.pruning.plans[-1]["plan"]), (*before, after), tables


def _plan(arch, tables, criterion, normalisation, pruning):
    budget = arch.num_parameters() - pruning.schedule.target_params
    return select(arch, tables[criterion], budget, pruning.constraints, normalisation,
                  phase_target=pruning.schedule.target_params).plan


@pytest.mark.parametrize("criterion, prune, normalisation, unswitched", [
    ("taylor", {}, "per_parameter", ("fisher", "per_parameter")),
    ("activation", {}, "per_parameter", ("fisher", "per_parameter")),
    # on this toy model FFN channels are the cheapest by every normalisation but for Minitron's
    # head scores, where per group and per parameter disagree on heads versus whole KV groups
    ("activation", {"normalisation": "per_group", "kinds": ["head", "hidden"], "target_ratio": 0.9}, "per_group",
     ("activation", "per_parameter")),
    ("fisher", {"kind_weights": {"ffn": 20.0}}, {"ffn": 20.0}, ("fisher", "per_parameter")),
])
def test_a_switch_changes_the_ranking_the_event_prunes_by(single_rank, tmp_path, criterion, prune, normalisation,
                                                          unswitched):
    trainer, event, plan, (arch, *_), tables = _run_to_event(single_rank, tmp_path, criterion, **prune)
    expected = _plan(arch, tables, criterion, normalisation, trainer.pruning)
    assert plan == expected and expected != _plan(arch, tables, *unswitched, trainer.pruning)
    assert event["params_after"] <= trainer.pruning.schedule.target_params < event["params_after"] + event["unit_bound"]


def test_scoring_after_compensation_ranks_by_the_error_obs_leaves(single_rank, tmp_path):
    trainer, event, plan, (arch, _, window, groups, _), tables = _run_to_event(
        single_rank, tmp_path, score_after_compensation=True)
    factors = residual_factors(window, groups, arch, trainer.config.prune.damping)  # one rank: no-op sums
    fc2 = window.consumers[(1, "linear_fc2")].weight
    before, after = removal_errors(fc2, window.hessians[(1, "linear_fc2")], torch.tensor([[5]]))
    assert float(factors["ffn"][1][5]) == pytest.approx(float(after / before), rel=1e-12)
    values = torch.cat([*factors["head"], *factors["kv_group"], *factors["ffn"], factors["hidden"]])
    assert bool(((values > 0) & (values < 1)).all()), "OBS repairs part of every removal, never all"
    assert set(event["error_left_by_obs"]) == {"head", "kv_group", "ffn", "hidden"}
    expected = _plan(arch, {"after": scale_scores(tables["fisher"], factors)}, "after", "per_parameter", trainer.pruning)
    assert plan == expected != _plan(arch, tables, "fisher", "per_parameter", trainer.pruning)


def test_compensation_none_collects_no_hessians_and_slices_the_consumers(single_rank, tmp_path):
    _, _, plan, (arch, old, window, _, new), _ = _run_to_event(single_rank, tmp_path, compensation="none")
    assert window.consumers == {} and window.hessians == {}, "only the norms' energies are collected"
    assert plan.ffn, "the event removed FFN channels"
    keep_hidden = kept_hidden(arch, plan.hidden)
    for l in range(arch.num_layers):
        keep = complement(arch.layers[l].ffn_hidden_size, plan.removed_ffn(l))
        name = f"decoder.layers.{l}.mlp.linear_fc2.weight"
        assert torch.equal(new[name], old[name][keep_hidden][:, keep]), f"{name} is its plain slice"


def test_the_rms_correction_switched_off_leaves_the_norm_weights_plain_slices(single_rank, tmp_path):
    _, _, plan, (arch, old, window, _, new), _ = _run_to_event(single_rank, tmp_path, hidden_rms_correction=False,
                                                            kinds=["hidden"], compensation="none")
    assert window is None, "nothing to collect: no Hessians, no energies"
    assert plan.hidden, "the event removed hidden channels"
    keep = kept_hidden(arch, plan.hidden)
    for name in [n for n in old if "layernorm" in n]:
        assert torch.equal(new[name], old[name][keep]), f"{name} is its plain slice"


@pytest.mark.parametrize("criterion", ["fisher", "activation"])
def test_prune_once_reaches_the_target_architecture_with_either_saliency(single_rank, tmp_path, criterion):
    trainer, event, plan, (arch, *_), tables = _run_to_event(single_rank, tmp_path, criterion, target_ratio=None,
                                                               target_architecture=TARGET)
    target = target_from_spec(arch, TARGET)
    assert trainer.arch == target and event["params_after"] == target.num_parameters()
    expected = select_architecture(arch, tables[criterion], target, trainer.pruning.constraints).plan
    other = select_architecture(arch, tables["taylor"], target, trainer.pruning.constraints).plan
    assert plan == expected and expected != other

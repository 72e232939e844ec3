"""bench/quality's arms are configs the trainer accepts, and each differs from A where it says."""

import pytest

from bench.quality.arms import ABLATIONS, ArmFactory
from bench.quality.quality import TINY_BUDGET, TINY_SOURCE, TINY_TARGET_RATIO, constraints, scaled
from efficientllm.architecture import architecture_from_config
from efficientllm.config import config_from_dict
from efficientllm.pruning.targets import propose_uniform


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    source = architecture_from_config(config_from_dict({"model": TINY_SOURCE["model"]}), vocab_size=4096)
    target = round(TINY_TARGET_RATIO * source.num_parameters())
    return ArmFactory(
        source_config={**TINY_SOURCE, "run_dir": str(root / "run")},
        start={"checkpoint": {"load": str(root / "source"), "finetune": True}},
        data={"data_path": [str(root / "train")], "tokenizer_model": str(root / "tokenizer.model")},
        target_params=target, uniform=propose_uniform(source, target, constraints(TINY_SOURCE["prune"])),
        budget=scaled(TINY_BUDGET, 0.5), data_seed=1001)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_is_a_valid_config_that_changes_a(factory, ablation):
    base, changed = config_from_dict(factory.a()).to_dict(), config_from_dict(factory.a(ablation)).to_dict()
    differing = {section for section in base if base[section] != changed[section]}
    assert differing and differing <= {"prune", "saliency"}


def test_early_ablation_ends_pruning_in_the_first_quarter(factory):
    budget = factory.budget
    early = config_from_dict(factory.a("A-early")).prune
    assert early.end_step == budget.budget_steps // 4 < budget.prune_end
    assert early.start_step == budget.prune_start


def test_prune_once_arms_go_straight_to_the_uniform_target(factory):
    for criterion in ("fisher", "activation"):
        config = config_from_dict(factory.c(criterion))
        assert config.prune.start_step == config.prune.end_step == factory.budget.prune_start
        assert config.saliency.criterion == criterion


def test_figures_keep_the_recorded_results_of_sources_not_rerun_here(tmp_path):
    import json

    from bench.quality.figures import recorded_elsewhere

    previous = tmp_path / "quality.json"
    assert recorded_elsewhere(previous, {}) == {}
    previous.write_text(json.dumps({"results": {"smollm2-x0.25": {"seed1": {"A": 1}}, "tiny-x0.5": {"seed1": {"A": 2}}}}))
    kept = recorded_elsewhere(previous, {"tiny-x0.5": {"seed1": {"A": 3}}})
    assert kept == {"smollm2-x0.25": {"seed1": {"A": 1}}}

"""Pruning-aware pretraining on real ranks: the same Plans at every pipeline layout, the target
size reached at TP2PP2, OBS better than plain slicing, tied embeddings identical on both stages,
and bad pruning input refused up front."""

from __future__ import annotations

import subprocess
import sys

from efficientllm.architecture import Architecture
from efficientllm.pruning.layout import group_sizes
from tests.distributed.conftest import TINY_MODEL, train_on_ranks
from tests.distributed.launch import REPO

PRUNE = {"enabled": True, "target_ratio": 0.5, "start_step": 3, "end_step": 8, "interval": 1,
         "min_hidden": 16, "align": 2}


def test_plans_are_identical_across_pipeline_layouts_and_tp2pp2_reaches_the_target(tiny_config, tmp_path):
    config = tiny_config(training={"train_iters": 10}, prune=PRUNE)
    base = train_on_ranks(1, config, tmp_path / "tp1pp1")[0]
    pp2 = train_on_ranks(2, config, tmp_path / "tp1pp2", "parallel.pipeline_model_parallel_size=2")
    assert [r["plans"] for r in pp2] == [base["plans"]] * 2, "every rank and layout makes the same Plans"
    assert pp2[0]["architecture"] == base["architecture"]
    assert len(base["plans"]) == PRUNE["end_step"] - PRUNE["start_step"] + 1, "an event every step"

    tp2pp2 = train_on_ranks(4, config, tmp_path / "tp2pp2", "parallel.tensor_model_parallel_size=2",
                            "parallel.pipeline_model_parallel_size=2")
    assert all(r["plans"] == tp2pp2[0]["plans"] for r in tp2pp2)
    source = Architecture.uniform(vocab_size=512, **TINY_MODEL)
    target = round(PRUNE["target_ratio"] * source.num_parameters())
    final = Architecture.from_dict(tp2pp2[0]["architecture"])
    final.validate(2)
    sizes = group_sizes(source)
    one_unit = max(2 * sizes.ffn, 2 * sizes.head + 2 * sizes.kv_group, PRUNE["align"] * sizes.hidden)
    assert target - one_unit <= final.num_parameters() <= target
    assert all(l == l for l in tp2pp2[0]["losses"]), "training continues with finite losses"


def test_obs_compensation_lowers_the_loss_right_after_an_event(tiny_config, tmp_path):
    one_event = {**PRUNE, "target_ratio": 0.6, "start_step": 6, "end_step": 6}
    losses = {}
    for compensation in ("obs", "none"):
        config = tiny_config(training={"train_iters": 7, "lr": 3e-3},
                             prune={**one_event, "compensation": compensation})
        losses[compensation] = train_on_ranks(1, config, tmp_path / compensation)[0]["losses"]
    assert losses["obs"][:6] == losses["none"][:6], "identical until the event"
    # Step 7's loss is the first forward of the pruned model.
    assert losses["obs"][6] < losses["none"][6], losses


def _cli_error(config, *overrides: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "efficientllm", "train", "--config", str(config), *(f"--set={o}" for o in overrides)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


def test_unreachable_or_too_large_targets_stop_before_training(tiny_config):
    config = tiny_config(training={"train_iters": 10}, prune=PRUNE)
    assert "is not below the source model" in _cli_error(config, "prune.target_ratio=null", "prune.target_params=10000000")
    assert "unreachable" in _cli_error(config, "prune.target_ratio=null", "prune.target_params=1000")


def test_tied_embedding_copies_on_two_stages_stay_bit_identical_through_hidden_events(tiny_config, tmp_path):
    config = tiny_config(model={"untie_embeddings_and_output_weights": False}, training={"train_iters": 6},
                         prune={**PRUNE, "kinds": ["hidden"], "target_ratio": 0.85, "start_step": 2, "end_step": 5})
    first, last = train_on_ranks(2, config, tmp_path, "parallel.pipeline_model_parallel_size=2")
    assert Architecture.from_dict(first["architecture"]).hidden_size < TINY_MODEL["hidden_size"]
    assert len(first["plans"]) >= 2, "hidden channels went at several events"
    assert first["digests"]["embedding.word_embeddings.weight"] == last["digests"]["output_layer.weight"]

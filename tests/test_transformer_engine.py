"""Transformer Engine: refused with pruning at config load, used for the continued pretraining
after the last event, loaded through megatron-core's local -> TE names, and refused in one line
where it cannot be imported.

TE is not installed on the CPU machines: building a TE model and loading a local checkpoint
into it is run by bench/gpu_check.sh on a GPU image that has TE."""

from __future__ import annotations

import importlib.util

import pytest

from efficientllm.architecture import Architecture
from efficientllm.config import ConfigError, load_config
from efficientllm.errors import USER_ERRORS
from efficientllm.model import rebuilt_after_pruning, uses_transformer_engine
from efficientllm.training import after_pruning

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
PRUNE = ["prune.enabled=true", "prune.target_ratio=0.5", "prune.start_step=10", "prune.end_step=20",
         "training.train_iters=30"]


def test_te_with_pruning_is_refused_at_config_load_with_the_way_out():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*PRUNE, "model.transformer_impl=transformer_engine"])
    message = str(err.value)
    assert "\n" not in message
    assert "prune.enabled" in message and "model.transformer_impl_after_pruning=transformer_engine" in message


@pytest.mark.parametrize("overrides, field", [
    (["prune.enabled=false", "model.transformer_impl_after_pruning=transformer_engine"], "needs prune.enabled"),
    ([*PRUNE, "model.transformer_impl_after_pruning=te"], "got 'te'"),
])
def test_the_after_pruning_impl_needs_pruning_and_a_known_impl(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_the_te_spec_is_used_only_once_the_pruning_phase_is_over():
    config = load_config(None, [*PRUNE, "model.transformer_impl_after_pruning=transformer_engine"])
    assert not uses_transformer_engine(config, 19)
    assert uses_transformer_engine(config, 20) and rebuilt_after_pruning(config, 20)
    assert [s for s in range(31) if after_pruning.rebuild_due(config, s)] == [20]
    config.prune.end_step = config.training.train_iters  # nothing left to train: no rebuild
    assert not any(after_pruning.rebuild_due(config, s) for s in range(31))
    plain = load_config(None, PRUNE)
    assert not any(uses_transformer_engine(plain, s) or after_pruning.rebuild_due(plain, s)
                   for s in range(31))


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed here")
@pytest.mark.parametrize("overrides, field", [
    (["prune.enabled=false", "model.transformer_impl=transformer_engine"], "model.transformer_impl="),
    ([*PRUNE, "model.transformer_impl_after_pruning=transformer_engine"], "model.transformer_impl_after_pruning="),
])
def test_without_te_a_te_run_stops_in_one_line_before_any_work(overrides, field, tmp_path):
    from efficientllm.distributed import LaunchEnv
    from efficientllm.training.trainer import Trainer

    config = load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(USER_ERRORS) as err:
        Trainer(config, LaunchEnv(0, 1, 0, "127.0.0.1", 1, "single"))
    message = str(err.value)
    assert message.startswith(field) and "cannot be imported" in message and "\n" not in message
    assert not (tmp_path / "run").exists(), "nothing was prepared"


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed here")
def test_building_a_te_model_without_te_is_refused(single_rank):
    from efficientllm.model import ModelOptions, TransformerEngineUnavailable, build_model_chunks

    arch = Architecture.uniform(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2,
                                num_query_groups=1, ffn_hidden_size=32)
    with pytest.raises(TransformerEngineUnavailable, match="model.transformer_impl=transformer_engine"):
        build_model_chunks(arch, ModelOptions(seq_length=8, transformer_engine=True))


def test_local_checkpoints_name_the_norms_as_tes_fused_layer_norm_weights(single_rank):
    # What lets the TE model of the continued pretraining load the pruned local model.
    from efficientllm.model import ModelOptions, build_model_chunks

    arch = Architecture.uniform(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=2,
                                num_query_groups=1, ffn_hidden_size=32)
    chunk = build_model_chunks(arch, ModelOptions(seq_length=8))[0]
    keys = {name: entry.key for name, entry in chunk.sharded_state_dict().items()}
    for layer in (0, 1):
        block = chunk.decoder.layers[layer]
        at = f"decoder.layers.{layer}"
        assert keys[f"{at}.input_layernorm.weight"] == f"{at}.self_attention.linear_qkv.layer_norm_weight"
        assert keys[f"{at}.pre_mlp_layernorm.weight"] == f"{at}.mlp.linear_fc1.layer_norm_weight"
        assert block.input_layernorm.weight is not None and block.pre_mlp_layernorm.weight is not None
    checkpoint_names = set(keys.values())
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in checkpoint_names)


def test_the_finished_pruning_record_keeps_the_events_through_a_checkpoint():
    source = Architecture.uniform(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=32)
    plans = [{"step": 3, "plan": {"ffn": [[0, [1]]]}}, {"step": 4, "plan": {}}]
    record = after_pruning.FinishedPruning(source, {"target_params": 100, "events": 0}, plans)
    restored = after_pruning.FinishedPruning(source, record.summary())
    restored.load_state_dict(record.state_dict())
    assert restored.plans == plans and restored.summary() == {"target_params": 100, "events": 2}
    assert record.local_state_dict() == {}, "no statistics are kept"

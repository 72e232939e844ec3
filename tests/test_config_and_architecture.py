"""Bad config, shapes and launch environments stop with one clear line before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from efficientllm.architecture import Architecture, ArchitectureError
from efficientllm.config import ConfigError, load_config
from efficientllm.distributed import LaunchError, first_slurm_host, read_launch_env
from tests.distributed.launch import REPO


def _arch(**layer) -> Architecture:
    widths = dict(num_attention_heads=8, num_query_groups=4, ffn_hidden_size=256) | layer
    return Architecture.uniform(hidden_size=64, num_layers=2, vocab_size=512, head_dim=8, **widths)


def test_default_config_loads_and_validates():
    config = load_config()
    assert config.model.hidden_size > 0 and config.training.train_iters > 0


def test_unknown_config_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'training.lrr'; did you mean 'lr'\?"):
        load_config(None, ["training.lrr=0.1"])


def test_override_with_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match="training.train_iters: expected int"):
        load_config(None, ["training.train_iters=many"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_world_size_not_divisible_by_tp_times_pp():
    config = load_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible by .* = 2x2"):
        config.validate(world_size=6)


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    config = load_config(None, ["training.global_batch_size=6", "training.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="global_batch_size 6 is not divisible"):
        config.validate(world_size=1)


def test_layers_not_divisible_by_pipeline_stages():
    with pytest.raises(ConfigError, match="num_layers 4 is not divisible by pipeline stages 3"):
        load_config(None, ["model.num_layers=4", "parallel.pipeline_model_parallel_size=3"])


def test_widths_not_divisible_by_tp_name_the_layer_and_valid_sizes():
    arch = _arch().replace_layer(1, ffn_hidden_size=250)
    with pytest.raises(ArchitectureError, match=r"layer 1: ffn_hidden_size 250 is not divisible by tensor_model_parallel_size 4; valid TP sizes: \[1, 2\]"):
        arch.validate(4)


def test_gqa_heads_not_divisible_by_groups():
    with pytest.raises(ArchitectureError, match="num_attention_heads 6 is not divisible by num_query_groups 4"):
        _arch(num_attention_heads=6)


def test_architecture_json_round_trip_and_parameter_count():
    arch = _arch().replace_layer(0, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)
    again = Architecture.from_json(arch.to_json())
    assert again == arch
    h, d, v = 64, 8, 512
    layer0 = h * (4 + 4) * d + 4 * d * h + 3 * h * 128 + 2 * h
    layer1 = h * (8 + 8) * d + 8 * d * h + 3 * h * 256 + 2 * h
    assert arch.num_parameters() == 2 * v * h + h + layer0 + layer1


def test_slurm_environment_gives_rank_world_and_master():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "42"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (3, 4, 1, "slurm")
    assert launch.master_addr == first_slurm_host("node[07-08]")


def test_inconsistent_slurm_environment_is_refused():
    with pytest.raises(LaunchError, match="rank 4 is not in"):
        read_launch_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"})


def test_cli_prints_one_line_and_exits_2_on_bad_config():
    result = subprocess.run(
        [sys.executable, "-m", "efficientllm", "train", "--set", "model.hiden_size=8"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("efficientllm: error:")]
    assert lines == ["efficientllm: error: unknown config key 'model.hiden_size'; did you mean 'hidden_size'?"]


def test_prune_end_step_beyond_training_is_refused():
    with pytest.raises(ConfigError, match=r"end_step 500 must satisfy .* training.train_iters \(200\)"):
        load_config(None, ["prune.end_step=500", "training.train_iters=200"])


def test_prune_align_incompatible_with_tp_is_refused():
    with pytest.raises(ConfigError, match="prune.align 6 is incompatible with tensor_model_parallel_size 4"):
        load_config(None, ["prune.align=6", "parallel.tensor_model_parallel_size=4"])


def test_prune_needs_exactly_one_target():
    with pytest.raises(ConfigError, match="exactly one of prune.target_params, prune.target_ratio and prune.target_architecture"):
        load_config(None, ["prune.target_params=1000"])


def test_pruning_with_the_distributed_optimizer_is_accepted():
    """Optimizer surgery and saliency handle megatron's DistributedOptimizer (see
    tests/distributed/test_pruning_distributed_optimizer.py)."""
    config = load_config(None, ["parallel.use_distributed_optimizer=true"])
    assert config.prune.enabled and config.parallel.use_distributed_optimizer


def test_scoring_after_compensation_without_obs_is_refused_by_name():
    with pytest.raises(ConfigError, match="prune.score_after_compensation .* needs prune.compensation=obs"):
        load_config(None, ["prune.score_after_compensation=true", "prune.compensation=none"])

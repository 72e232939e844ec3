"""The same model, data and seed train the same way at every TP/PP/DP layout."""

from __future__ import annotations

from tests.distributed.conftest import train_on_ranks

# fp32 on CPU: TP/PP only change where sums happen; DP changes the reduction order of grads.
LOSS_RTOL = 1e-5


def _last_stage_losses(records: list[dict]) -> list[float]:
    return records[0]["losses"]  # every rank logs the DP-averaged last-stage loss


def _assert_losses_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"step {step}: {x} vs {y}"




def test_tp_pp_layouts_give_the_same_losses(tiny_config, tmp_path):
    config = tiny_config()
    base = _last_stage_losses(train_on_ranks(1, config, tmp_path / "tp1pp1"))
    assert base[-1] < base[0], "loss must fall over the first steps"
    for world, tp, pp in ((2, 2, 1), (2, 1, 2), (4, 2, 2)):
        records = train_on_ranks(
            world, config, tmp_path / f"tp{tp}pp{pp}",
            f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        )
        _assert_losses_close(base, _last_stage_losses(records))


def test_data_parallel_replicas_stay_identical(tiny_config, tmp_path):
    config = tiny_config()
    base = _last_stage_losses(train_on_ranks(1, config, tmp_path / "dp1"))
    records = train_on_ranks(4, config, tmp_path / "tp2dp2", "parallel.tensor_model_parallel_size=2")
    _assert_losses_close(base, _last_stage_losses(records))
    by_coords = {}
    for r in records:
        by_coords.setdefault((r["tp_rank"], r["pp_rank"]), []).append(r["digests"])
    for coords, replicas in by_coords.items():
        assert len(replicas) == 2
        assert replicas[0] == replicas[1], f"DP replicas of shard {coords} diverged"


def test_interleaved_pipeline_sequence_parallel_and_distributed_optimizer_give_the_same_losses(
    tiny_config, tmp_path
):
    # PP=2 with virtual stages sends both directions between the same two ranks: this guards the
    # gloo message-order problem that batched p2p ops cause there.
    config = tiny_config()
    base = _last_stage_losses(train_on_ranks(1, config, tmp_path / "base"))
    records = train_on_ranks(
        4, config, tmp_path / "vp",
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2", "parallel.sequence_parallel=true",
        "parallel.use_distributed_optimizer=true",
    )
    _assert_losses_close(base, _last_stage_losses(records))


def test_heterogeneous_architecture_trains_at_tp2pp2(tiny_config, tmp_path):
    layers = [
        {"num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128},
        {"num_attention_heads": 2, "num_query_groups": 2, "ffn_hidden_size": 64},
        {"num_attention_heads": 6, "num_query_groups": 2, "ffn_hidden_size": 96},
        {"num_attention_heads": 2, "num_query_groups": 2, "ffn_hidden_size": 32},
    ]
    config = tiny_config(model={"layers": layers, "head_dim": 16},
                         training={"train_iters": 15, "lr": 3e-3})
    records = train_on_ranks(4, config, tmp_path / "hetero",
                             "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    losses = _last_stage_losses(records)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, f"loss did not go down: {losses}"
    from efficientllm.architecture import Architecture, LayerWidths

    expected = Architecture(64, 512, 16, tuple(LayerWidths(**l) for l in layers), False).num_parameters()
    assert records[0]["num_parameters"] == expected

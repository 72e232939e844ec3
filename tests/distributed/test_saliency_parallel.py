"""The global score tables (fisher, taylor, activation), the local Hessians and the residual
energies do not depend on the TP/PP layout."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.distributed.conftest import TINY_MODEL
from tests.distributed.launch import REPO, run_ranks

# fp32 training on CPU: layouts only change where sums happen (losses agree to ~1e-6).
TABLE_RTOL = 1e-4
HESSIAN_RTOL = 1e-4
STEPS, WINDOW = 4, 2


def saliency_on_ranks(world_size: int, config, out, *overrides: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(
        world_size,
        [str(REPO / "tests/distributed/workers/saliency.py"), str(out), str(config),
         "saliency.enabled=true", f"saliency.hessian_window={WINDOW}", *overrides],
        out / "logs", timeout=60,
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def config(tiny_corpus, tmp_path_factory):
    """The tiny run of tests/distributed/conftest.py, shared by this module's launches."""
    root = tmp_path_factory.mktemp("saliency")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(root / "run"),
        "model": dict(TINY_MODEL),
        "data": {"data_path": [tiny_corpus["train"]], "valid_data_path": [tiny_corpus["valid"]],
                 "tokenizer_model": tiny_corpus["tokenizer"], "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": STEPS,
                     "lr_warmup_iters": 1, "log_interval": 1, "eval_interval": 0, "tensorboard": False},
    }))
    return path


@pytest.fixture(scope="module")
def base(config, tmp_path_factory):
    """The single-process reference (one launch for the module)."""
    return saliency_on_ranks(1, config, tmp_path_factory.mktemp("tp1pp1"))[0]


def _flat(table: dict, kind: str) -> torch.Tensor:
    value = table[kind]
    return value if torch.is_tensor(value) else torch.cat(list(value))


def _assert_tables_close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for kind in b:
        x, y = _flat(a, kind), _flat(b, kind)
        # relative per element, with a floor of TABLE_RTOL x the kind's largest score for the
        # near-zero ones (a taylor score is |a sum| and can cancel to round-off).
        torch.testing.assert_close(x, y, rtol=TABLE_RTOL, atol=TABLE_RTOL * y.abs().max().item(), msg=kind)


def _tp_block(key: tuple, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The block of the single-process Hessian that a TP rank's local Hessian covers."""
    if key[1] in ("linear_proj", "linear_fc2"):  # row-parallel: local inputs only
        n = full.shape[0] // tp_size
        return full[tp_rank * n:(tp_rank + 1) * n, tp_rank * n:(tp_rank + 1) * n]
    return full  # hidden-side inputs are replicated over TP


def test_score_table_and_hessians_at_tp2pp2_equal_tp1pp1(config, base, tmp_path):
    ranks = saliency_on_ranks(
        4, config, tmp_path / "tp2pp2",
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
    )
    for crit in ("fisher", "taylor", "group_fisher", "activation"):
        for r in ranks:  # identical on every rank, bit for bit
            for kind, value in r["tables"][crit].items():
                assert torch.equal(_flat(r["tables"][crit], kind), _flat(ranks[0]["tables"][crit], kind))
        _assert_tables_close(ranks[0]["tables"][crit], base["tables"][crit])
    assert set(base["tables"]["fisher"]) == {"head", "kv_group", "ffn", "hidden", "layer"}
    assert (base["tables"]["group_fisher"]["hidden"] > 0).all()  # summed over stages, not left at zero

    seen = set()
    for r in ranks:
        for key, h in r["hessians"].items():
            seen.add(key)
            expected = _tp_block(key, base["hessians"][key], r["tp_rank"], r["tp_size"])
            torch.testing.assert_close(h, expected, rtol=HESSIAN_RTOL, atol=HESSIAN_RTOL * expected.abs().max().item(), msg=str(key))
    assert seen == set(base["hessians"])
    _assert_energies_close(ranks, base)


def _assert_energies_close(ranks: list[dict], base: dict) -> None:
    """Every norm's input energy per channel, per token, equals the single-process one."""
    seen = set()
    for r in ranks:
        for key, energy in r["energies"].items():
            seen.add(key)
            expected = base["energies"][key]
            torch.testing.assert_close(energy / energy.sum(), expected / expected.sum(), rtol=HESSIAN_RTOL, atol=0, msg=str(key))
    assert seen == set(base["energies"]) and len(seen) == 2 * 4 + 1  # two per layer, the final norm


def test_data_parallel_and_sequence_parallel_average_to_the_same_table(config, base, tmp_path):
    ranks = saliency_on_ranks(
        4, config, tmp_path / "tp2dp2",
        "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
    )
    for crit in ("fisher", "taylor", "group_fisher", "activation"):
        _assert_tables_close(ranks[0]["tables"][crit], base["tables"][crit])
    for r in ranks:
        for key, h in r["hessians"].items():
            expected = _tp_block(key, base["hessians"][key], r["tp_rank"], r["tp_size"])
            torch.testing.assert_close(h, expected, rtol=HESSIAN_RTOL, atol=HESSIAN_RTOL * expected.abs().max().item(), msg=str(key))
    _assert_energies_close(ranks, base)

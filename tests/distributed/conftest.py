"""A small real corpus, tokenised once per session, and a tiny model config for multi-rank runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.distributed.launch import REPO, run_ranks

TINY_MODEL = {
    "hidden_size": 64,
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, str]:
    """stdlib text → a 512-piece tokenizer → train/valid .bin/.idx."""
    from efficientllm.data.corpus import stdlib_corpus
    from efficientllm.data.preprocess import preprocess_files
    from efficientllm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    split = stdlib_corpus(heldout_fraction=0.1, max_bytes=400_000)
    tokenizer = train_tokenizer(split.train, root / "tok.model", vocab_size=512)
    preprocess_files(split.train, tokenizer, root / "train")
    preprocess_files(split.heldout, tokenizer, root / "valid")
    return {"tokenizer": str(root / "tok.model"), "train": str(root / "train"), "valid": str(root / "valid")}


@pytest.fixture
def tiny_config(tiny_corpus, tmp_path):
    """Write a tiny run config; returns a function(**section overrides) -> config path."""

    def make(**sections) -> Path:
        config = {
            "run_dir": str(tmp_path / "run"),
            "model": dict(TINY_MODEL),
            "data": {
                "data_path": [tiny_corpus["train"]],
                "valid_data_path": [tiny_corpus["valid"]],
                "tokenizer_model": tiny_corpus["tokenizer"],
                "seq_length": 32,
            },
            "training": {
                "micro_batch_size": 2, "global_batch_size": 8, "train_iters": 6,
                "lr_warmup_iters": 1, "log_interval": 1, "eval_interval": 0, "tensorboard": False,
            },
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make


def train_on_ranks(world_size: int, config: Path, out: Path, *overrides: str, timeout: float = 240) -> list[dict]:
    """Run the training worker on `world_size` ranks; returns each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(world_size, [str(REPO / "tests/distributed/workers/train.py"), str(out), str(config), *overrides],
              out / "logs", timeout=timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]

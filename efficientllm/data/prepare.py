"""From the run config to train/valid datasets: corpus → tokenizer → .bin/.idx → GPT datasets.

With no `data.data_path`, a built-in corpus (`data.corpus`: the interpreter's stdlib sources,
or English documentation text) is tokenised into the run directory once, on rank 0, and reused while its recipe is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset

from efficientllm.atomic import write_atomically
from efficientllm.config import Config
from efficientllm.data import DataError
from efficientllm.data.corpus import builtin_corpus, corpus_record
from efficientllm.data.datasets import build_gpt_datasets, check_vocab
from efficientllm.data.preprocess import preprocess_files
from efficientllm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Dataset
    valid: Dataset | None
    record: dict[str, Any]

    def check_vocab(self, model_vocab: int) -> None:
        check_vocab(self.tokenizer.vocab_size, model_vocab)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _default_corpus(config: Config, data_dir: Path) -> dict[str, Any]:
    """Build (or reuse) the default corpus files; returns the record stored beside them."""
    d = config.data
    recipe = {
        "corpus": d.corpus,
        "corpus_max_bytes": d.corpus_max_bytes,
        "corpus_heldout_fraction": d.corpus_heldout_fraction,
        "tokenizer_model": d.tokenizer_model,
        "tokenizer_vocab_size": d.tokenizer_vocab_size,
        "seed": config.training.seed,
    }
    record_path = data_dir / "corpus.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("recipe") == recipe:
            return record
    data_dir.mkdir(parents=True, exist_ok=True)
    split = builtin_corpus(d.corpus, d.corpus_heldout_fraction, d.corpus_max_bytes)
    if d.tokenizer_model:
        tokenizer = load_tokenizer(d.tokenizer_model)
        tokenizer_path = d.tokenizer_model
    else:
        tokenizer_path = str(data_dir / "tokenizer.model")
        tokenizer = train_tokenizer(split.train, tokenizer_path, d.tokenizer_vocab_size, seed=config.training.seed)
    record = {
        "recipe": recipe,
        "corpus": corpus_record(split),
        "tokenizer_model": tokenizer_path,
        "train": preprocess_files(split.train, tokenizer, data_dir / "train"),
        "valid": preprocess_files(split.heldout, tokenizer, data_dir / "valid"),
    }
    write_atomically(record_path, json.dumps(record, indent=1, default=str))
    return record


def prepare_data(config: Config, run_dir: Path) -> PreparedData:
    d, t = config.data, config.training
    data_dir = run_dir / "data"
    if d.data_path:
        if not d.tokenizer_model:
            raise DataError("data.tokenizer_model is required with data.data_path (the .model the data was tokenised with)")
        record: dict[str, Any] = {"data_path": d.data_path, "valid_data_path": d.valid_data_path,
                                  "tokenizer_model": d.tokenizer_model}
        data_path, valid_path = d.data_path, d.valid_data_path
    else:
        if _is_rank0():
            _default_corpus(config, data_dir)
        _barrier()
        record = json.loads((data_dir / "corpus.json").read_text())
        data_path, valid_path = [str(data_dir / "train")], [str(data_dir / "valid")]
    tokenizer = load_tokenizer(record["tokenizer_model"])
    train, valid = build_gpt_datasets(
        tokenizer,
        data_path=data_path,
        valid_data_path=valid_path,
        split=d.split,
        seq_length=d.seq_length,
        seed=t.seed,
        train_samples=t.train_iters * t.global_batch_size,
        # Every evaluation reads the same held-out batches, so the curve compares like with like.
        valid_samples=t.eval_iters * t.global_batch_size if t.eval_interval else 0,
        data_cache_path=data_dir / "index_cache",
    )
    return PreparedData(tokenizer, train, valid, record)

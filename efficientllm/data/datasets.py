"""megatron-core GPT datasets from indexed-dataset prefixes: one prefix, a weighted blend, a split.

Built with megatron-core's own `BlendedMegatronDatasetBuilder`, `GPTDatasetConfig` and
`GPTDataset`, so samples, shuffling and blending are exactly Megatron-LM's. Every input is
checked first (files, index integrity, weights, split shares); megatron-core itself would stop on
an assert, hang, or fail mid-training on the same inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split
from torch.utils.data import Dataset

from efficientllm.data import DataError
from efficientllm.data.indexed import IndexedSummary, check_prefix
from efficientllm.data.tokenizer import Tokenizer

Blend = tuple[list[str], list[float] | None]


def check_vocab(tokenizer_vocab: int, model_vocab: int, source: str = "the tokenizer") -> None:
    """A token id without an embedding row would crash (or on GPU corrupt) the first step."""
    if tokenizer_vocab > model_vocab:
        raise DataError(
            f"{source} has {tokenizer_vocab} tokens but the model's vocab_size is {model_vocab}; "
            f"set vocab_size >= {tokenizer_vocab} or use a smaller tokenizer"
        )


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(items: Sequence[str], name: str = "data_path") -> Blend:
    """Megatron-LM's `--data-path`: `[prefix, ...]` or `[weight, prefix, weight, prefix, ...]`.

    A list whose first item is a number is read as weight/prefix pairs. Weights are kept as
    given (megatron normalises them); a single weighted prefix needs no weight.
    """
    items = [str(item).strip() for item in items]
    if not items:
        raise DataError(f"{name} is empty; give [prefix] or [weight, prefix, weight, prefix]")
    if _number(items[0]) is None:
        return items, None
    if len(items) % 2:
        raise DataError(
            f"{name} {items} starts with a weight but has an odd length; give weight, prefix pairs"
        )
    prefixes, weights = items[1::2], []
    for text, prefix in zip(items[0::2], prefixes):
        weight = _number(text)
        if weight is None or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"{name}: weight {text!r} of {prefix} is not a positive number")
        weights.append(weight)
    return prefixes, (weights if len(prefixes) > 1 else None)


def _split_shares(split: str) -> list[float]:
    """'969,30,1' -> train, valid, test shares summing to 1."""
    parts = [_number(p) for p in split.split(",")]
    numbers = all(p is not None and 0 <= p < math.inf for p in parts)
    if not (1 <= len(parts) <= 3 and numbers and sum(parts) > 0):
        raise DataError(
            f"split {split!r} is not valid; give up to 3 non-negative train,valid,test weights "
            f"with a positive sum, e.g. '969,30,1'"
        )
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def _check_split_shares(
    split: str, matrix: list, summaries: list[IndexedSummary], needed: list[Split]
) -> None:
    """megatron loops forever building an epoch of a split that got no documents."""
    for part in needed:
        bounds = matrix[part.value]
        for summary in summaries:
            n = summary.documents
            if bounds is None or round(bounds[1] * n) <= round(bounds[0] * n):
                raise DataError(
                    f"split {split!r} gives the {part.name} part no documents of {summary.prefix} "
                    f"({n} documents); raise that share or use more data"
                )


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """megatron's BlendedDataset asks torch.distributed for the rank on a cache miss without
    checking it is initialised; outside torchrun a one-process group answers it."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_gpt_datasets(
    tokenizer: Tokenizer,
    *,
    data_path: Sequence[str],
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    data_cache_path: str | os.PathLike,
    split: str = "969,30,1",
    valid_data_path: Sequence[str] = (),
) -> tuple[Dataset, Dataset | None]:
    """The train and validation datasets (valid is None when `valid_samples` is 0).

    Without `valid_data_path`, train and valid are the `split` shares of every prefix of
    `data_path` (by document, as in Megatron-LM); with it, `data_path` is all training data.
    A weighted blend has exactly the requested number of samples; a single prefix or unweighted
    list has at least as many (whole epochs). Samples are dicts of `tokens`, `labels`,
    `loss_mask`, `position_ids` (no attention mask: the model applies its causal mask), plus
    `dataset_id` for a blend. Must be called on every rank: rank 0 builds megatron's index cache
    under `data_cache_path`, the others then load it.
    """
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    if train_samples <= 0 or valid_samples < 0:
        raise DataError(
            f"need train_samples > 0 and valid_samples >= 0, got {train_samples}, {valid_samples}"
        )
    train_blend = parse_blend(data_path, "data_path")
    valid_blend = parse_blend(valid_data_path, "valid_data_path") if valid_data_path else None
    prefixes = train_blend[0] + (valid_blend[0] if valid_blend else [])
    summaries = {prefix: check_prefix(prefix) for prefix in prefixes}
    needed = [Split.train] + ([Split.valid] if valid_samples else [])

    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=str(data_cache_path),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    if valid_blend is None:
        shares = _split_shares(split)
        matrix = convert_split_vector_to_split_matrix(shares)
        _check_split_shares(split, matrix, [summaries[p] for p in train_blend[0]], needed)
        # megatron re-parses the string with a looser regex ('1e2' reads as two numbers)
        plain = ",".join(format(share, "f") for share in shares)
        config = GPTDatasetConfig(blend=train_blend, split=plain, **common)
        # The test share is never read and an unneeded valid share must not be built (an empty
        # one would hang); dropping them leaves the train/valid document ranges unchanged.
        config.split_matrix = [
            bounds if part in needed else None for part, bounds in zip(Split, matrix)
        ]
    else:
        per_split = [train_blend, valid_blend if valid_samples else None, None]
        config = GPTDatasetConfig(blend_per_split=per_split, **common)

    sizes = [train_samples, valid_samples, 0]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with _process_group():
        train, valid, _ = builder.build()
    return train, valid

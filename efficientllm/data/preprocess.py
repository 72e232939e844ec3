"""Tokenize text and JSONL files into a megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`).

Written with megatron-core's own `IndexedDatasetBuilder`, so the files are the same format as
Megatron-LM's tools/preprocess_data.py output: one document per text file or JSONL line, each
ending with the EOD token, token dtype chosen from the vocab size the way megatron does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from efficientllm.atomic import temporary_sibling
from efficientllm.data import DataError
from efficientllm.data.jsonl import json_lines
from efficientllm.data.tokenizer import Tokenizer

JSON_SUFFIXES = (".jsonl", ".json")  # one JSON object per line; anything else is plain text
_BATCH_CHARS = 1 << 20  # encode about 1 MB of text per sentencepiece call


def read_documents(path: Path, json_key: str = "text") -> Iterator[str]:
    """The documents of one input file: a plain-text file is one, a JSONL file one per line."""
    if path.suffix not in JSON_SUFFIXES:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        return
    for where, record in json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            raise DataError(f"{where}: no string field {json_key!r}; set json_key to the field that holds the text")
        yield record[json_key]


def preprocess_files(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike,
    *,
    json_key: str = "text",
) -> dict[str, Any]:
    """Write `output_prefix.bin/.idx` and return a record: documents, tokens (EOD included), bytes.

    Both files are written under a temporary prefix and renamed when complete, `.idx` last, so a
    reader never finds an index whose data is missing. Empty documents are skipped and counted.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("preprocess needs at least one input file")
    for path in paths:
        if not path.is_file():
            raise DataError(f"preprocess input {path} not found; give text or .jsonl files")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(prefix)
    tmp_bin, tmp_idx = f"{tmp}.bin", f"{tmp}.idx"

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    record = {"prefix": str(prefix), "documents": 0, "tokens": 0, "bytes": 0, "skipped_empty": 0}

    def flush(batch: list[str]) -> None:
        for ids in tokenizer.tokenize_batch(batch):
            ids.append(tokenizer.eod)
            builder.add_document(ids, [len(ids)])
            record["tokens"] += len(ids)
        record["documents"] += len(batch)
        batch.clear()

    try:
        batch: list[str] = []
        batch_chars = 0
        for path in paths:
            for text in read_documents(path, json_key):
                if not text:
                    record["skipped_empty"] += 1
                    continue
                record["bytes"] += len(text.encode("utf-8"))
                batch.append(text)
                batch_chars += len(text)
                if batch_chars >= _BATCH_CHARS:
                    flush(batch)
                    batch_chars = 0
        flush(batch)
        if record["documents"] == 0:
            raise DataError(f"preprocess inputs {[str(p) for p in paths]} hold no text")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    except BaseException:
        builder.data_file.close()
        for leftover in (tmp_bin, tmp_idx):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    record["dtype"] = dtype.__name__
    return record

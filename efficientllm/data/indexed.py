"""Checking a megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`) before anything reads it.

megatron-core's reader trusts its files: a missing file is an assert, a truncated `.bin` is an
error deep inside a training step. This reads only the `.idx` header and arrays (the layout of
megatron-core's `_IndexWriter`) and the `.bin` size, so a bad prefix stops with one line first.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import DType

from efficientllm.data import DataError

_MAGIC = b"MMIDIDX\x00\x00"  # the first bytes of every megatron index file, version 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


@dataclass(frozen=True)
class IndexedSummary:
    prefix: str
    documents: int
    tokens: int
    dtype: type[np.number]


def check_prefix(prefix: str) -> IndexedSummary:
    """Validate `prefix.bin`/`prefix.idx` and return their counts, or raise DataError."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise DataError(
                f"data prefix {prefix}: {path} not found; a prefix names PREFIX.bin and "
                f"PREFIX.idx as written by `efficientllm preprocess` or Megatron-LM's "
                f"tools/preprocess_data.py"
            )
    with open(idx_path, "rb") as stream:
        raw = stream.read(_HEADER.size)
    idx_size = os.path.getsize(idx_path)

    def corrupt(why: str) -> DataError:
        return DataError(f"{idx_path} is not a valid megatron index ({why}); re-run preprocess")

    if len(raw) < _HEADER.size:
        raise corrupt(f"{idx_size} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, code, sequences, documents = _HEADER.unpack(raw)
    if magic != _MAGIC or version != 1:
        raise corrupt(f"bad header {magic!r} version {version}, expected {_MAGIC!r} 1")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise corrupt(f"unknown token dtype code {code}") from None
    # int32 lengths and int64 pointers per sequence, then int64 document boundaries
    arrays_size = sequences * (4 + 8) + documents * 8
    if idx_size < _HEADER.size + arrays_size:
        raise corrupt(f"{idx_size} bytes, the header promises {_HEADER.size + arrays_size}")
    if documents < 2:
        raise DataError(f"data prefix {prefix} holds no documents; preprocess some text into it")

    arrays = np.memmap(idx_path, mode="r", offset=_HEADER.size)
    lengths = np.frombuffer(arrays, np.int32, sequences)
    boundaries = np.frombuffer(arrays, np.int64, documents, offset=sequences * 12)
    if boundaries[0] != 0 or boundaries[-1] != sequences or np.any(np.diff(boundaries) < 0):
        raise corrupt("document boundaries do not cover the sequences")
    tokens = int(lengths.sum(dtype=np.int64))
    expected = tokens * np.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < expected:
        raise DataError(
            f"{bin_path} is truncated: {bin_size} bytes, its index {idx_path} needs {expected}; "
            f"re-run preprocess"
        )
    return IndexedSummary(prefix=prefix, documents=documents - 1, tokens=tokens, dtype=dtype)

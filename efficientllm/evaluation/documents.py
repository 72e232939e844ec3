"""The documents a perplexity is measured on: text files, JSONL files, or a megatron indexed
dataset (`PREFIX.bin/.idx`).

A plain-text file is one document; a `.jsonl` file is one document a line (its `text` field).
Text is tokenised by the model's tokenizer. An indexed dataset is already tokenised: each
document's tokens are scored as stored, without its trailing end-of-document token, and its
text (for the byte and word counts) is what the tokenizer decodes them to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from efficientllm.data import DataError
from efficientllm.data.preprocess import read_documents


@dataclass(frozen=True)
class Document:
    text: str
    tokens: list[int] | None = None  # None: tokenise `text`


def read_text_files(paths: Sequence[str | Path], json_key: str = "text") -> list[Document]:
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"text file {path} not found; give plain-text or .jsonl files")
        texts = list(read_documents(path, json_key))
        if not any(texts):
            raise DataError(f"text file {path} is empty: it holds no document to measure")
        documents.extend(Document(text) for text in texts if text)
    if not documents:
        raise DataError("no text files given; pass --text FILE... or --data PREFIX")
    return documents


def read_indexed(prefix: str, eod: int, detokenize) -> list[Document]:
    """Every document of `PREFIX.bin/.idx` (checked first), as stored tokens plus decoded text."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from efficientllm.data.indexed import check_prefix

    check_prefix(prefix)
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    documents = []
    for first, last in zip(bounds[:-1], bounds[1:]):
        tokens = [int(t) for s in range(first, last) for t in dataset[s]]
        if tokens and tokens[-1] == eod:
            tokens.pop()
        if tokens:
            documents.append(Document(detokenize(tokens), tokens))
    if not documents:
        raise DataError(f"data prefix {prefix} holds only empty documents")
    return documents

"""Perplexity over whole documents with lm-eval's rolling windows, and bits per byte.

A document's tokens are cut into non-overlapping windows of `max_length` predicted tokens: the
first window's first token is conditioned on the tokenizer's prefix token (BOS, else EOS/EOD),
every later full window on the one token before it, and a last, shorter window on as many
earlier tokens as fit (lm-eval's `get_rolling_token_windows` with context 1, made disjoint).

Corpus figures are sums over all documents, as lm-eval aggregates them:
    token_perplexity = exp(-ΣLL / Σtokens)       (depends on the tokenizer)
    word_perplexity  = exp(-ΣLL / Σwords)        words = len(re.split(r"\\s+", text))
    byte_perplexity  = exp(-ΣLL / Σbytes)        UTF-8 bytes of the text
    bits_per_byte    = -ΣLL / (Σbytes · ln 2)    comparable across tokenizers
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

from efficientllm.evaluation.documents import Document
from efficientllm.evaluation.lm import LogLikelihoodModel, TokenPair


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[TokenPair]:
    """(context, continuation) windows whose continuations cover `tokens` exactly once."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    start = first
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        # The input is the max_length tokens before `end`; all but the predicted ones are context.
        windows.append((tokens[end - max_length - 1:start], tokens[start:end]))
        start = end
    return windows


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


@dataclass(frozen=True)
class PerplexityResult:
    documents: int
    tokens: int
    bytes: int
    words: int
    loglikelihood: float
    max_length: int
    seconds: float
    per_document: list[float]  # each document's Σ log p

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / (self.bytes * math.log(2))

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "words": self.words,
            "max_length": self.max_length, "loglikelihood": self.loglikelihood,
            "bits_per_byte": self.bits_per_byte, "byte_perplexity": self.byte_perplexity,
            "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
            "seconds": self.seconds, "tokens_per_s": self.tokens / self.seconds if self.seconds else float("nan"),
        }


def evaluate_perplexity(lm: LogLikelihoodModel, documents: Sequence[Document]) -> PerplexityResult:
    start = time.perf_counter()
    tokenized = [d.tokens if d.tokens is not None else lm.tokenizer.tokenize(d.text) for d in documents]
    windows = [rolling_windows(t, lm.tokenizer.prefix_id, lm.max_length) for t in tokenized]
    owners = [doc for doc, ws in enumerate(windows) for _ in ws]
    scores = lm.loglikelihoods([[w] for ws in windows for w in ws])
    per_document = [0.0] * len(documents)
    for doc, (score,) in zip(owners, scores):
        per_document[doc] += score
    return PerplexityResult(
        documents=len(documents),
        tokens=sum(len(t) for t in tokenized),
        bytes=sum(len(d.text.encode("utf-8")) for d in documents),
        words=sum(count_words(d.text) for d in documents),
        loglikelihood=sum(per_document),
        max_length=lm.max_length,
        seconds=time.perf_counter() - start,
        per_document=per_document,
    )

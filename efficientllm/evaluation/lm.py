"""The log-likelihood backend: what every evaluation asks of a model, and the batching both
backends share.

An evaluation asks for Σ log p(continuation | context) of token pairs, grouped: the pairs of one
group (the choices of one question) always share a batch. Inputs are built the way lm-eval's
HFLM builds them: (context + continuation) cut to the last `max_length + 1` tokens, the last
token dropped, right-padded; only the continuation's positions are scored.

Backends: `megatron_lm.MegatronLM` (our GPT model at any TP/PP, from a checkpoint or from a
run's live model chunks) and `hf_lm.HFCausalLM` (a Hugging Face directory through transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from efficientllm.evaluation import EvaluationError

TokenPair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class EvalTokenizer(Protocol):
    """What evaluation reads from a tokenizer (efficientllm.data.tokenizer.load_tokenizer)."""

    prefix_id: int  # conditions a first token that has no context (lm-eval: BOS, else EOS)

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


class LogLikelihoodModel(Protocol):
    tokenizer: EvalTokenizer
    max_length: int  # tokens one forward pass sees

    def loglikelihoods(self, groups: Sequence[Sequence[TokenPair]]) -> list[list[float]]:
        """Σ log p(continuation | context) of every pair, in the shape of `groups`, the same
        numbers on every rank."""
        ...


@dataclass(frozen=True)
class Batch:
    pairs: list[TokenPair]
    indices: list[int]  # the pairs' positions in the flattened request list


@dataclass(frozen=True)
class Packed:
    tokens: torch.Tensor  # [rows, length] inputs, right-padded
    targets: torch.Tensor  # [rows, length] the next token at every position
    scored: torch.Tensor  # [rows, length] True where the target is a continuation token

    @property
    def position_ids(self) -> torch.Tensor:
        return torch.arange(self.tokens.shape[1]).expand_as(self.tokens)

    def to(self, device: torch.device) -> "Packed":
        return Packed(self.tokens.to(device), self.targets.to(device), self.scored.to(device))

    def sums(self, token_logprobs: torch.Tensor) -> torch.Tensor:
        """[rows] float64: the scored positions' log-probabilities added up."""
        return torch.where(self.scored, token_logprobs.double(), 0.0).sum(dim=1)


def _window(pair: TokenPair, max_length: int) -> list[int]:
    context, continuation = pair
    if not continuation:
        raise EvaluationError("a request has an empty continuation: nothing to score")
    if len(continuation) > max_length:
        raise EvaluationError(f"a continuation of {len(continuation)} tokens is longer than max_length {max_length}; "
                              f"raise --max-length")
    return (context + continuation)[-(max_length + 1):]


def input_length(pair: TokenPair, max_length: int) -> int:
    return len(_window(pair, max_length)) - 1


def pack(pairs: Sequence[TokenPair], max_length: int, rows: int | None = None, length: int | None = None,
         pad_id: int = 0) -> Packed:
    """Right-padded inputs/targets of `pairs`, padded further to `rows` x `length` if given."""
    windows = [_window(p, max_length) for p in pairs]
    rows = rows or len(windows)
    length = length or max(len(w) - 1 for w in windows)
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    targets = torch.full((rows, length), pad_id, dtype=torch.long)
    scored = torch.zeros((rows, length), dtype=torch.bool)
    for row, (window, (_, continuation)) in enumerate(zip(windows, pairs)):
        n = len(window) - 1
        tokens[row, :n] = torch.tensor(window[:-1])
        targets[row, :n] = torch.tensor(window[1:])
        scored[row, n - len(continuation):n] = True
    return Packed(tokens, targets, scored)


# A forward pass holds [rows, length, vocab] fp32 logits (and the loss's copy of them): at
# SmolLM2's 8192-token windows and 49k vocabulary 16 rows would be 26 GB.
LOGITS_BUDGET_BYTES = 2 << 30


def tokens_per_forward(vocab_size: int) -> int:
    """Padded tokens one forward pass may take so that its fp32 logits fit LOGITS_BUDGET_BYTES."""
    return max(1, LOGITS_BUDGET_BYTES // (4 * vocab_size))


def plan_batches(groups: Sequence[Sequence[TokenPair]], batch_size: int, max_length: int,
                 max_tokens: int | None = None) -> list[Batch]:
    """Whole groups into batches of up to `batch_size` pairs and, with `max_tokens`, of up to
    that many padded tokens (a bigger group gets one to itself), longest first so that a batch
    pads little."""
    starts, flat = [], 0
    for group in groups:
        starts.append(flat)
        flat += len(group)
    longest = [max(input_length(p, max_length) for p in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda g: -longest[g])
    batches: list[Batch] = []
    pairs: list[TokenPair] = []
    indices: list[int] = []
    width = 0  # the batch's padded length: its first group's, the longest
    for g in order:
        rows = len(pairs) + len(groups[g])
        if pairs and (rows > batch_size or (max_tokens is not None and rows * width > max_tokens)):
            batches.append(Batch(pairs, indices))
            pairs, indices = [], []
        width = width if pairs else longest[g]
        pairs.extend(groups[g])
        indices.extend(range(starts[g], starts[g] + len(groups[g])))
    if pairs:
        batches.append(Batch(pairs, indices))
    return batches


def regroup(values: Sequence[float], groups: Sequence[Sequence[TokenPair]]) -> list[list[float]]:
    out, start = [], 0
    for group in groups:
        out.append(list(values[start:start + len(group)]))
        start += len(group)
    return out


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory, as opposed to one of our checkpoints."""
    return (path / "config.json").is_file()

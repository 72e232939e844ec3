"""Zero-shot multiple choice by log-likelihood: acc and acc_norm exactly as lm-eval computes them.

A choice's score is Σ log p(continuation tokens | context). The continuation's tokens are
what tokenising context + continuation adds to tokenising the context alone (trailing
whitespace of the context moves to the continuation first), so a tokenizer that merges across
the boundary is scored the way lm-eval scores it. acc takes the argmax of the scores; acc_norm
divides each by its choice's length in characters first; ties go to the first choice. The
choices of one question are scored in one batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from efficientllm.evaluation import EvaluationError
from efficientllm.evaluation.lm import EvalTokenizer, LogLikelihoodModel, TokenPair, input_length
from efficientllm.evaluation.tasks import Item, TaskData


def encode_pair(tokenizer: EvalTokenizer, context: str, continuation: str) -> TokenPair:
    """(context tokens, continuation tokens) the way lm-eval's `_encode_pair` splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # nothing to condition on but the prefix token, as lm-eval does
        tokens = tokenizer.tokenize(continuation)
        if tokens and tokens[0] == tokenizer.prefix_id:
            return tokens[:1], tokens[1:]
        return [tokenizer.prefix_id], tokens
    whole = tokenizer.tokenize(context + continuation)
    context_tokens = tokenizer.tokenize(context)
    return context_tokens, whole[len(context_tokens):]


def _stderr(values: np.ndarray) -> float:
    """lm-eval's standard error of a mean (sample standard deviation / sqrt n)."""
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


@dataclass(frozen=True)
class TaskResult:
    task: str
    split: str
    source: str
    items: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    tokens: int  # what the model read: every request's input tokens
    seconds: float
    loglikelihoods: list[list[float]]  # per item, per choice

    def summary(self) -> dict[str, Any]:
        """The JSON-able record (without the per-choice scores)."""
        record = {k: v for k, v in self.__dict__.items() if k != "loglikelihoods"}
        record["items_per_s"] = self.items / self.seconds if self.seconds else float("nan")
        record["tokens_per_s"] = self.tokens / self.seconds if self.seconds else float("nan")
        return record


@dataclass(frozen=True)
class EncodedTask:
    """A task's first items as token pairs, checked to fit `max_length`."""

    task: TaskData
    items: tuple[Item, ...]
    groups: list[list[TokenPair]]  # per item, per choice
    max_length: int


def encode_task(tokenizer: EvalTokenizer, task: TaskData, max_length: int, limit: int | None = None) -> EncodedTask:
    items = task.items[:limit] if limit else task.items
    groups = [[encode_pair(tokenizer, context, continuation) for context, continuation in item.requests]
              for item in items]
    for index, group in enumerate(groups):
        longest = max(len(continuation) for _, continuation in group)
        if longest > max_length:
            raise EvaluationError(f"{task.name} item {index}: a choice of {longest} tokens is longer than "
                                  f"max_length {max_length}; raise --max-length")
    return EncodedTask(task, items, groups, max_length)


def score_task(lm: LogLikelihoodModel, encoded: EncodedTask, started: float | None = None) -> TaskResult:
    """acc / acc_norm of an encoded task; `started` (perf_counter) counts encoding in the time."""
    start = time.perf_counter() if started is None else started
    scores = lm.loglikelihoods(encoded.groups)
    seconds = time.perf_counter() - start
    items, task = encoded.items, encoded.task
    labels = np.array([item.label for item in items])
    predicted = np.array([np.argmax(np.array(s)) for s in scores])
    normalised = np.array([
        np.argmax(np.array(s) / np.array([float(len(c)) for c in item.choices]))
        for s, item in zip(scores, items)
    ])
    acc, acc_norm = (predicted == labels).astype(float), (normalised == labels).astype(float)
    return TaskResult(
        task=task.name, split=task.split, source=str(task.source), items=len(items),
        acc=float(acc.mean()), acc_stderr=_stderr(acc),
        acc_norm=float(acc_norm.mean()), acc_norm_stderr=_stderr(acc_norm),
        tokens=sum(input_length(pair, encoded.max_length) for group in encoded.groups for pair in group),
        seconds=seconds, loglikelihoods=scores,
    )


def evaluate_task(lm: LogLikelihoodModel, task: TaskData, limit: int | None = None) -> TaskResult:
    """Score the first `limit` items of `task` (all of them without a limit)."""
    start = time.perf_counter()
    return score_task(lm, encode_task(lm.tokenizer, task, lm.max_length, limit), started=start)

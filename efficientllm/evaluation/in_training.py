"""The same evaluation inside a training run, on its live model chunks at its own TP/PP/DP.

`training.eval_tasks` (zero-shot tasks) and `training.eval_text` (text files for bits per byte)
are read once at setup; every `training.eval_interval` steps they are scored on the current
(perhaps just pruned) chunks with the run's tokenizer and `data.seq_length`, and the trainer
logs the result as an `eval` record (metrics.jsonl, TensorBoard `eval/<task>/acc`, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from efficientllm.evaluation.documents import Document, read_text_files
from efficientllm.evaluation.lm import EvalTokenizer
from efficientllm.evaluation.megatron_lm import MegatronLM
from efficientllm.evaluation.multiple_choice import encode_task, score_task
from efficientllm.evaluation.perplexity import evaluate_perplexity
from efficientllm.evaluation.tasks import load_task

TEXT = "text"  # the key of the bits-per-byte figures in an eval record


class TrainingEvaluation:
    """Tasks and text read and tokenised once, at setup (so an item that does not fit
    `data.seq_length` stops the run before it trains); scored on the chunks when called."""

    def __init__(self, tasks: Sequence[str], texts: Sequence[str], limit: int | None, tokenizer: EvalTokenizer,
                 max_length: int, batch_size: int) -> None:
        self.tasks = [encode_task(tokenizer, load_task(name, limit), max_length) for name in tasks]
        self.documents = [Document(d.text, tokenizer.tokenize(d.text)) for d in read_text_files(texts)] if texts else []
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, chunks: list[torch.nn.Module]) -> dict[str, Any]:
        """{task: {acc, acc_norm, items, split}, "text": {bits_per_byte, ...}}, the same on every rank."""
        lm = MegatronLM(chunks, self.tokenizer, self.max_length, self.batch_size)
        record: dict[str, Any] = {}
        for task in self.tasks:
            result = score_task(lm, task)
            record[result.task] = {"acc": result.acc, "acc_norm": result.acc_norm, "items": result.items,
                                   "split": result.split}
        if self.documents:
            text = evaluate_perplexity(lm, self.documents)
            record[TEXT] = {"bits_per_byte": text.bits_per_byte, "token_perplexity": text.token_perplexity,
                            "word_perplexity": text.word_perplexity, "documents": text.documents,
                            "bytes": text.bytes}
        return record


def from_config(config, tokenizer: EvalTokenizer) -> TrainingEvaluation | None:
    """The run's evaluation (`training.eval_tasks` / `eval_text`), or None when it has none."""
    t = config.training
    if not (t.eval_tasks or t.eval_text):
        return None
    return TrainingEvaluation(t.eval_tasks, t.eval_text, t.eval_tasks_limit, tokenizer,
                              max_length=config.data.seq_length, batch_size=t.micro_batch_size)


def describe(step: int, record: dict[str, Any]) -> str:
    """One log line: every task's acc / acc_norm, and the text's bits per byte."""
    parts = [f"{name} acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} ({r['items']} items)"
             for name, r in record.items() if name != TEXT and isinstance(r, dict)]
    if TEXT in record:
        parts.append(f"text bits/byte {record[TEXT]['bits_per_byte']:.4f}")
    return f"[eval] step {step} " + " | ".join(parts)

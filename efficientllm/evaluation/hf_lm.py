"""The log-likelihood backend for a Hugging Face directory, through transformers (one process).

Scored like lm-eval's HFLM: the model's logits over the right-padded batch, log-softmax in
fp32, the continuation tokens' entries gathered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from efficientllm import distributed
from efficientllm.evaluation import EvaluationError
from efficientllm.evaluation.lm import EvalTokenizer, TokenPair, pack, plan_batches, regroup, tokens_per_forward

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a config that names no context length
_CONTEXT_LENGTH_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")


def context_length(config) -> int:
    """The model's context length as lm-eval reads it from a transformers config."""
    for name in _CONTEXT_LENGTH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


class HFCausalLM:
    def __init__(self, path: str | Path, *, tokenizer: str | Path | None = None, max_length: int | None = None,
                 batch_size: int = 16, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        from efficientllm.data.tokenizer import load_tokenizer

        path = Path(path)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
        except (OSError, ValueError) as err:
            hint = " (a remote-code model: pass --trust-remote-code)" if "trust_remote_code" in str(err) else ""
            raise EvaluationError(f"cannot load the Hugging Face model in {path}{hint}: "
                                  f"{str(err).splitlines()[0]}") from None
        self.model.to(distributed.device())
        self.tokenizer: EvalTokenizer = load_tokenizer(tokenizer or path)
        self.max_length = max_length or context_length(self.model.config)
        self.batch_size = batch_size

    @torch.no_grad()
    def loglikelihoods(self, groups: Sequence[Sequence[TokenPair]]) -> list[list[float]]:
        totals = torch.zeros(sum(len(g) for g in groups), dtype=torch.float64)
        budget = tokens_per_forward(self.model.config.vocab_size)
        for batch in plan_batches(groups, self.batch_size, self.max_length, budget):
            packed = pack(batch.pairs, self.max_length).to(self.model.device)
            logits = self.model(packed.tokens).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            totals[batch.indices] = packed.sums(logprobs.gather(-1, packed.targets.unsqueeze(-1)).squeeze(-1)).cpu()
        return regroup(totals.tolist(), groups)

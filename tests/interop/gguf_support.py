"""What the GGUF tests share: the real llama.cpp (skipped only where node-llama-cpp cannot be
had), and our megatron-core model of a checkpoint, which llama.cpp is compared with: built at
TP1 PP1 in this process (the session's single-rank group), loaded with the checkpoint's weights."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from efficientllm import assets


def require_llamacpp() -> ModuleType:
    """efficientllm.interop.llamacpp, once node-llama-cpp is installed (by assets) or skipped."""
    try:
        assets.node_llama_cpp()
    except assets.AssetUnavailable as err:
        pytest.skip(f"llama.cpp (node-llama-cpp) cannot be had here: {err}")
    from efficientllm.interop import llamacpp

    return llamacpp


class Ours:
    def __init__(self, ckpt: Path) -> None:
        from efficientllm.evaluation.megatron_lm import MegatronLM

        self.lm = MegatronLM.from_checkpoint(ckpt)
        self.model = self.lm.chunks[0].eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] fp32 logits of one sequence."""
        tokens = torch.tensor([ids])
        return self.model(tokens, torch.arange(len(ids))[None], None)[0].float()

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i >= 1."""
        logprobs = self.logits(ids).log_softmax(-1)
        return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        ids = list(prompt)
        for _ in range(count):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[len(prompt):]

    def perplexity(self, ids: list[int]) -> float:
        """exp of the mean -log p(t_i | t_<i), i >= 1, through our evaluation backend."""
        total = self.lm.loglikelihoods([[(ids[:1], ids[1:])]])[0][0]
        return math.exp(-total / (len(ids) - 1))

"""Decode and prefill wall times of one model in each backend: our megatron-core forward, the
Hugging Face export in transformers, the GGUF in llama.cpp.

The same work everywhere: batch-1 decode of `new_tokens` greedy tokens after a prompt, timed from
the first generated token to the last (new_tokens - 1 single-token steps with a KV cache), and
a batch of sequences prefilled into the KV cache with only the last token's logits. Models are
loaded before any clock starts; every function takes all the models of one backend and
interleaves them repeat by repeat, so the machine's load hits them alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from efficientllm.interop.llamacpp import Timings


@dataclass(frozen=True)
class Workload:
    prompt: list[int]  # decode prompt (batch 1)
    new_tokens: int
    prefill: list[list[int]]  # one row per sequence, all the same length
    repeats: int = 3

    @property
    def decode_steps(self) -> int:
        return self.new_tokens - 1

    @property
    def prefill_tokens(self) -> int:
        return sum(map(len, self.prefill))


@dataclass(frozen=True)
class Timing(Timings):
    """Per-repeat decode and prefill seconds and the greedy tokens decoded (the same work in every
    backend), in the form llama.cpp reports them."""

    def rates(self, work: Workload) -> dict[str, float]:
        """Tokens per second, the median over repeats."""
        return {"decode": work.decode_steps / _median(self.decode_s),
                "prefill": work.prefill_tokens / _median(self.prefill_s)}


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _interleaved(models: Sequence, work: Workload, decode: Callable, prefill: Callable) -> list[Timing]:
    """`decode(model)` -> (seconds, tokens), `prefill(model)` -> seconds, repeat by repeat."""
    times: list[tuple[list[float], list[float], list[int]]] = [([], [], []) for _ in models]
    for _ in range(work.repeats):
        for model, (decode_s, prefill_s, tokens) in zip(models, times):
            seconds, tokens[:] = decode(model)
            decode_s.append(seconds)
            prefill_s.append(prefill(model))
    return [Timing(*t) for t in times]


def _greedy(first: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], steps: int) -> tuple[float, list[int]]:
    """Decode `steps` tokens after `first` ([1, 1]) with `step(token, i)` -> next token, timed."""
    tokens, token = [int(first)], first
    start = time.perf_counter()
    for i in range(steps):
        token = step(token, i)
        tokens.append(int(token))
    return time.perf_counter() - start, tokens


def _clock(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


@torch.no_grad()
def megatron_timings(checkpoints: Sequence[Path], work: Workload) -> list[Timing]:
    """Our GPTModel at TP1 PP1 in fp32, with megatron-core's static KV cache."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from efficientllm.evaluation.megatron_lm import MegatronLM
    from efficientllm.interop.local_group import single_process_group

    with single_process_group():
        models = [MegatronLM.from_checkpoint(path).chunks[0].eval() for path in checkpoints]

        def forward(model, tokens: torch.Tensor, start: int, context) -> torch.Tensor:
            positions = torch.arange(start, start + tokens.shape[1]).expand(tokens.shape[0], -1)
            logits = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += tokens.shape[1]
            return logits[:, -1]

        def decode(model) -> tuple[float, list[int]]:
            context = StaticInferenceContext(1, len(work.prompt) + work.new_tokens)
            first = forward(model, torch.tensor([work.prompt]), 0, context).argmax(-1, keepdim=True)
            return _greedy(first, lambda token, i: forward(model, token, len(work.prompt) + i, context)
                           .argmax(-1, keepdim=True), work.decode_steps)

        def prefill(model) -> float:
            tokens = torch.tensor(work.prefill)
            context = StaticInferenceContext(tokens.shape[0], tokens.shape[1])
            return _clock(lambda: forward(model, tokens, 0, context))

        return _interleaved(models, work, decode, prefill)


@torch.no_grad()
def transformers_timings(hf_dirs: Sequence[Path], work: Workload) -> list[Timing]:
    """The Hugging Face exports in transformers, fp32, with its dynamic KV cache."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True).eval()
              for path in hf_dirs]

    def decode(model) -> tuple[float, list[int]]:
        out = model(torch.tensor([work.prompt]), use_cache=True, logits_to_keep=1)
        cache = out.cache  # a DynamicCache, filled in place by every step

        def step(token: torch.Tensor, i: int) -> torch.Tensor:
            return model(token, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

        return _greedy(out.logits[:, -1].argmax(-1, keepdim=True), step, work.decode_steps)

    def prefill(model) -> float:
        tokens = torch.tensor(work.prefill)
        return _clock(lambda: model(tokens, use_cache=True, logits_to_keep=1))

    return _interleaved(models, work, decode, prefill)


def llamacpp_timings(gguf_files: Sequence[Path], work: Workload, threads: int) -> list[Timing]:
    """The GGUF files in llama.cpp (node-llama-cpp's CPU build), one process per model and repeat."""
    from efficientllm.interop.llamacpp import TimingRequest, run_llamacpp

    request = TimingRequest(work.prompt, work.new_tokens, work.prefill, repeats=1)
    context = max(len(work.prompt) + work.new_tokens, work.prefill_tokens)

    def timed(path: Path):
        return run_llamacpp(path, timing=request, context_size=context, threads=threads).timings

    times: list[tuple[list[float], list[float], list[int]]] = [([], [], []) for _ in gguf_files]
    for _ in range(work.repeats):
        for path, (decode_s, prefill_s, tokens) in zip(gguf_files, times):
            measured = timed(path)
            decode_s.extend(measured.decode_s)
            prefill_s.extend(measured.prefill_s)
            tokens[:] = measured.continuation
    return [Timing(*t) for t in times]

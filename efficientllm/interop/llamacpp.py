"""The real llama.cpp, offline: node-llama-cpp's prebuilt CPU build run on a GGUF file.

One call starts one node process (llamacpp_run.mjs), loads the model once and answers every
request given: llama.cpp's own tokenization of texts, temperature-0 continuations of token ids,
per-token log-probabilities of token ids (for perplexity), and decode / batched prefill wall
times with the model load excluded (for bench/inference). Token ids go in, so a comparison
with our model never depends on either side's tokenizer; tokenization is compared on its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from efficientllm import assets

_SCRIPT = Path(__file__).with_name("llamacpp_run.mjs")


class LlamaCppFailed(RuntimeError):
    """llama.cpp refused the file or crashed; carries the end of its output."""


@dataclass(frozen=True)
class TimingRequest:
    """Decode `decode_tokens` greedy tokens after `decode_prompt` (timed from the first to the last,
    so decode_tokens - 1 single-token steps) and prefill every sequence of `prefill` in one batch,
    `repeats` times."""

    decode_prompt: Sequence[int]
    decode_tokens: int
    prefill: Sequence[Sequence[int]]
    repeats: int = 3


@dataclass(frozen=True)
class Timings:
    decode_s: list[float]  # per repeat, for decode_tokens - 1 steps
    prefill_s: list[float]  # per repeat, for the whole batch
    continuation: list[int]  # the decode_tokens greedy tokens


@dataclass(frozen=True)
class LlamaCppReply:
    tokenized: list[list[int]]  # one per text asked
    continuations: list[list[int]]  # one per prompt asked
    logprobs: list[list[float]]  # per scored sequence: log p(t_i | t_<i) for i = 1..n-1
    timings: Timings | None = None

    def perplexity(self, index: int = 0) -> float:
        values = self.logprobs[index]
        return math.exp(-sum(values) / len(values))


def run_llamacpp(
    gguf_path: str | Path,
    *,
    tokenize: Sequence[str] = (),
    greedy: Sequence[tuple[Sequence[int], int]] = (),
    score: Sequence[Sequence[int]] = (),
    timing: TimingRequest | None = None,
    context_size: int = 512,
    threads: int = 1,
    timeout: float = 600,
) -> LlamaCppReply:
    """Run llama.cpp on `gguf_path`: tokenize texts (no BOS), greedily continue (prompt ids,
    number of new tokens), score id sequences, time decoding and prefilling. Raises assets.AssetUnavailable when
    node-llama-cpp cannot be had, LlamaCppFailed when llama.cpp fails."""
    longest = max([len(p) + n for p, n in greedy] + [len(s) for s in score] + [1])
    if timing is not None:  # the prefill batch shares one context
        longest = max(longest, len(timing.decode_prompt) + timing.decode_tokens, sum(map(len, timing.prefill)))
    if longest > context_size:
        raise ValueError(f"a request of {longest} tokens does not fit context_size {context_size}")
    install = assets.node_llama_cpp()
    request = {
        "model": str(Path(gguf_path).resolve()),
        "contextSize": context_size,
        "threads": threads,
        "tokenize": list(tokenize),
        "greedy": [{"prompt": [int(t) for t in prompt], "tokens": int(n)} for prompt, n in greedy],
        "score": [[int(t) for t in tokens] for tokens in score],
    }
    if timing is not None:
        request["timing"] = {
            "decode": {"prompt": [int(t) for t in timing.decode_prompt], "tokens": int(timing.decode_tokens)},
            "prefill": [[int(t) for t in tokens] for tokens in timing.prefill], "repeats": int(timing.repeats)}
    env = {**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"}
    try:
        done = subprocess.run(["node", str(_SCRIPT), str(install)], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise LlamaCppFailed(f"llama.cpp did not finish on {gguf_path} within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise LlamaCppFailed(f"llama.cpp failed on {gguf_path} (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    reply = json.loads(done.stdout)
    timings = reply.get("timings")
    return LlamaCppReply(reply["tokenized"], reply["continuations"], reply["logprobs"],
                         Timings(timings["decode"], timings["prefill"], timings["continuation"]) if timings else None)

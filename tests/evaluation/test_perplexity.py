"""Rolling-window perplexity: lm-eval's windows, and batched scoring equal to a brute-force loop
that scores every token with its own forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from efficientllm.evaluation.documents import Document
from efficientllm.evaluation.hf_lm import HFCausalLM
from efficientllm.evaluation.lm import input_length, plan_batches
from efficientllm.evaluation.perplexity import count_words, evaluate_perplexity, rolling_windows


@pytest.mark.parametrize("length", [1, 5, 7, 8, 9, 23, 24, 25])
def test_windows_are_lm_evals_disjoint_rolling_windows(length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + length))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=8,
                                                                         context_len=1)]
    ours = rolling_windows(tokens, prefix_id=7, max_length=8)
    assert ours == [(list(c), list(t)) for c, t in theirs]
    assert [t for _, window in ours for t in window] == tokens, "every token predicted exactly once"
    assert all(len(c) + len(t) <= 8 + 1 for c, t in ours), "each window fits one forward of max_length"


def test_words_are_counted_like_lm_eval():
    assert count_words("two  words") == 2
    assert count_words(" leading space") == 3  # re.split gives an empty first field, as in lm-eval
    assert count_words("line\nbreak\ttab") == 3


def _brute_force_loglikelihood(model, tokens: list[int], prefix_id: int, max_length: int) -> float:
    """Every token scored alone: one forward over exactly the tokens lm-eval's windowing lets it
    see (the window's context and the window's tokens before it), its last logit read."""
    total = 0.0
    for context, window in rolling_windows(tokens, prefix_id, max_length):
        for j, token in enumerate(window):
            seen = (context + window[:j])[-max_length:]
            with torch.no_grad():
                logits = model(torch.tensor([seen])).logits[0, -1]
            total += torch.log_softmax(logits.double(), dim=-1)[token].item()
    return total


def test_batched_rolling_loglikelihood_equals_a_per_token_loop(tiny_hf, text_file):
    lm = HFCausalLM(tiny_hf, max_length=16, batch_size=5)
    text = text_file.read_text(encoding="utf-8")
    documents = [Document(text[:900]), Document(text[-300:]), Document("x")]
    result = evaluate_perplexity(lm, documents)
    for document, got in zip(documents, result.per_document):
        tokens = lm.tokenizer.tokenize(document.text)
        expected = _brute_force_loglikelihood(lm.model, tokens, lm.tokenizer.prefix_id, 16)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    assert result.bytes == n_bytes > sum(len(d.text) for d in documents), "bytes, not characters"
    assert result.bits_per_byte == pytest.approx(-sum(result.per_document) / (n_bytes * math.log(2)))
    assert result.token_perplexity == pytest.approx(math.exp(-result.loglikelihood / result.tokens))


def test_batches_are_capped_by_padded_tokens_and_keep_every_pair_once():
    """The logits budget: no batch pads beyond max_tokens unless it is one group alone, a
    multiple-choice group is never split, every pair is scored once."""
    groups = [[([1], [2] * n)] for n in (30, 29, 28, 10, 9, 3, 2)] + [[([1], [2] * 5)] * 4]
    batches = plan_batches(groups, batch_size=16, max_length=64, max_tokens=60)
    flat = [pair for group in groups for pair in group]
    assert sorted(i for b in batches for i in b.indices) == list(range(len(flat)))
    for batch in batches:
        width = max(input_length(p, 64) for p in batch.pairs)
        assert len(batch.pairs) * width <= 60
        assert all(flat[i] == p for i, p in zip(batch.indices, batch.pairs))
    assert [len(b.pairs) for b in batches] == [2, 2, 6, 1]  # the group of four stays whole
    assert len(plan_batches(groups, 16, 64)) == 1  # without the cap: batch_size alone
    [alone] = plan_batches([[([1], [2] * 50)] * 2], 16, 64, max_tokens=60)
    assert len(alone.pairs) == 2, "a group over the budget still gets a batch of its own"

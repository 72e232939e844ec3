"""bench/inference's physical limits, counted by hand for small shapes."""

from __future__ import annotations

import dataclasses

from bench.inference.limits import decode_weights_read, prefill_flops, speedup_limits
from efficientllm.architecture import Architecture, LayerWidths


def _arch(tie: bool) -> Architecture:
    return Architecture.uniform(hidden_size=8, num_layers=2, num_attention_heads=2, num_query_groups=1,
                                ffn_hidden_size=16, vocab_size=10, tie_embeddings=tie)


def test_decode_reads_every_weight_but_the_embedding_lookup():
    # per layer: qkv 8*(2+2)*4 = 128, proj 2*4*8 = 64, mlp 3*8*16 = 384, norms 16 -> 592
    blocks, final_norm, table = 2 * 592, 8, 10 * 8
    assert decode_weights_read(_arch(tie=False)) == blocks + final_norm + table  # output layer read, lookup not
    assert decode_weights_read(_arch(tie=True)) == blocks + final_norm + table  # the one table is the output layer


def test_prefill_counts_two_flops_per_block_weight_causal_attention_and_one_output_row():
    arch, length = _arch(tie=True), 3
    blocks = 2 * 2 * 592 * length
    attention = 2 * (4 * 2 * 4) * (1 + 2 + 3)  # layers * (4 * heads * head_dim) * attended positions
    assert prefill_flops(arch, length) == blocks + attention + 2 * 10 * 8


def test_limits_of_a_pruned_layer_follow_its_removed_weights():
    source = _arch(tie=True)
    assert speedup_limits(source, source, 16) == {"decode": 1.0, "prefill": 1.0}
    narrower = dataclasses.replace(source, layers=(LayerWidths(2, 1, 8), source.layers[1]))  # 128 FFN weights fewer
    limits = speedup_limits(source, narrower, 16)
    assert limits["decode"] == decode_weights_read(source) / (decode_weights_read(source) - 3 * 8 * 8)
    assert 1.0 < limits["decode"] and 1.0 < limits["prefill"]

"""The physical limits of a pruned model's speedup over its source, from the two Architectures.

- Batch-1 decode reads every weight once per token, except the embedding table, which is a
  lookup of one row (with tied embeddings the same matrix is read in full as the output layer).
  Its limit is the ratio of the weight bytes read per token. Norm weights are counted with the
  matrices; they are < 0.1% of the bytes, so the ratio is the same in f32 and in q8_0.
- Batch-8 prefill is compute-bound: 2 FLOPs per weight per token in the blocks, the attention
  products (QK^T and AV, 4 FLOPs per head dimension per attended position, causal), and the
  output layer once per sequence (every backend here materialises only the last token's logits
  while prefilling). Its limit is the ratio of FLOPs.
"""

from __future__ import annotations

from efficientllm.architecture import Architecture


def decode_weights_read(arch: Architecture) -> int:
    """Parameters read from memory to decode one token at batch 1."""
    # the lookup is the input half of the embedding parameters; tied, the output layer reads it all
    lookup = 0 if arch.tie_embeddings else arch.embedding_parameters() // 2
    return arch.num_parameters() - lookup


def prefill_flops(arch: Architecture, sequence_length: int) -> int:
    """FLOPs to prefill one sequence of `sequence_length` tokens (logits of the last token only)."""
    blocks = sum(arch.layer_parameters(layer) for layer in arch.layers)
    attended = sequence_length * (sequence_length + 1) // 2  # causal: token t sees t positions
    attention = sum(4 * layer.num_attention_heads * arch.head_dim for layer in arch.layers) * attended
    output_layer = 2 * arch.vocab_size * arch.hidden_size
    return 2 * blocks * sequence_length + attention + output_layer


def speedup_limits(source: Architecture, pruned: Architecture, prefill_length: int) -> dict[str, float]:
    """The largest speedups pruning can buy: decode (weight bytes) and prefill (FLOPs)."""
    return {
        "decode": decode_weights_read(source) / decode_weights_read(pruned),
        "prefill": prefill_flops(source, prefill_length) / prefill_flops(pruned, prefill_length),
    }

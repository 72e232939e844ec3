"""One model as the exporters see it: shapes, the hyper-parameters that are not shapes, full
(unsharded) fp32 tensors under Hugging Face Llama names, and its tokenizer files.

Tensor names (HF `LlamaForCausalLM`; a layer's shapes are that layer's own widths):
    model.embed_tokens.weight                       [vocab, h]
    model.layers.{i}.input_layernorm.weight         [h]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  [heads_i*d | kv_i*d, h]  (HF half-rotation rows)
    model.layers.{i}.self_attn.o_proj.weight        [h, heads_i*d]
    model.layers.{i}.post_attention_layernorm.weight [h]
    model.layers.{i}.mlp.{gate,up}_proj.weight      [ffn_i, h]
    model.layers.{i}.mlp.down_proj.weight           [h, ffn_i]
    model.norm.weight                               [h]
    lm_head.weight                                  [vocab, h]  (absent when tied)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from efficientllm.architecture import Architecture


@dataclass(frozen=True)
class ModelHparams:
    """What a Llama-family model needs beyond its shapes."""

    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    rope_scaling: dict[str, Any] | None = None  # HF's `rope_scaling` record (Llama 3), or None


@dataclass
class ExportSource:
    arch: Architecture
    hparams: ModelHparams
    state: dict[str, torch.Tensor]
    tokenizer_dir: Path  # a directory the tokenizer loads from (tokenizer.json and/or tokenizer.model)
    info: dict[str, Any] = field(default_factory=dict)  # provenance: checkpoint, iteration, tokens

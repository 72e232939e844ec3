"""`efficientllm export hf CKPT OUT_DIR [--padded]`: a checkpoint at any TP/PP -> a Hugging Face
directory (config.json, safetensors, tokenizer files) that transformers loads.

- uniform widths: a plain LlamaForCausalLM (no remote code);
- per-layer widths: our EfficientLLMForCausalLM (hf_modeling/, `auto_map`, loaded with
  `trust_remote_code=True`), which costs nothing at inference;
- `padded`: a plain LlamaForCausalLM zero-padded to the widest layer (query heads inside each KV
  group, whole KV groups, FFN channels): zero rows of q/k/v and gate/up, zero columns of o/down,
  so the logits are those of the pruned model, at the compute and memory of the padded one.

The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.atomic import temporary_sibling
from efficientllm.interop import hf_modeling
from efficientllm.interop.errors import ExportError
from efficientllm.interop.source import ExportSource

REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_efficientllm.EfficientLLMConfig",
    "AutoModelForCausalLM": "modeling_efficientllm.EfficientLLMForCausalLM",
}


@dataclass(frozen=True)
class PaddedWidths:
    """The one width every layer of a padded export gets."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


def padded_widths(arch: Architecture) -> PaddedWidths:
    """The smallest uniform widths that hold every layer: at least the most KV groups and heads
    per group of any layer, with heads dividing hidden_size (transformers' LlamaConfig requires
    it). Raises ExportError when no head count up to hidden_size does."""
    groups = max(l.num_query_groups for l in arch.layers)
    per_group = max(l.heads_per_group for l in arch.layers)
    ffn = max(l.ffn_hidden_size for l in arch.layers)
    h = arch.hidden_size
    candidates = [(g * p, g) for g in range(groups, h + 1) for p in range(per_group, h // g + 1) if h % (g * p) == 0]
    if not candidates:
        raise ExportError(
            f"a padded plain Llama cannot express this model: no head count with >= {groups} KV heads of "
            f">= {per_group} query heads divides hidden_size {h} (transformers' LlamaConfig requires "
            f"hidden_size % num_attention_heads == 0); export without --padded (remote code) instead"
        )
    heads, kv = min(candidates)
    return PaddedWidths(heads, kv, ffn)


def pad_layer(state: dict[str, torch.Tensor], index: int, layer: LayerWidths, to: PaddedWidths,
              head_dim: int) -> dict[str, torch.Tensor]:
    """One layer's HF tensors zero-padded to `to`: its query heads fill the first slots of their
    KV group, its KV groups the first groups; the new rows/columns are zeros."""
    p, d = f"model.layers.{index}.", head_dim
    g, hpg = layer.num_query_groups, layer.heads_per_group
    per_group = to.num_attention_heads // to.num_key_value_heads
    q = state[p + "self_attn.q_proj.weight"]
    h = q.shape[1]
    padded_q = q.new_zeros(to.num_key_value_heads, per_group, d, h)
    padded_q[:g, :hpg] = q.view(g, hpg, d, h)
    o = state[p + "self_attn.o_proj.weight"]
    padded_o = o.new_zeros(h, to.num_key_value_heads, per_group, d)
    padded_o[:, :g, :hpg] = o.view(h, g, hpg, d)

    def rows(tensor: torch.Tensor, count: int) -> torch.Tensor:
        out = tensor.new_zeros(count, tensor.shape[1])
        out[: tensor.shape[0]] = tensor
        return out

    down = state[p + "mlp.down_proj.weight"]
    padded_down = down.new_zeros(h, to.intermediate_size)
    padded_down[:, : down.shape[1]] = down
    return {
        p + "self_attn.q_proj.weight": padded_q.view(-1, h),
        p + "self_attn.k_proj.weight": rows(state[p + "self_attn.k_proj.weight"], to.num_key_value_heads * d),
        p + "self_attn.v_proj.weight": rows(state[p + "self_attn.v_proj.weight"], to.num_key_value_heads * d),
        p + "self_attn.o_proj.weight": padded_o.view(h, -1),
        p + "mlp.gate_proj.weight": rows(state[p + "mlp.gate_proj.weight"], to.intermediate_size),
        p + "mlp.up_proj.weight": rows(state[p + "mlp.up_proj.weight"], to.intermediate_size),
        p + "mlp.down_proj.weight": padded_down,
    }


def _plain_llama_fits(arch: Architecture) -> bool:
    return arch.is_uniform and arch.hidden_size % arch.layers[0].num_attention_heads == 0


def _token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _config_fields(source: ExportSource, widths: PaddedWidths) -> dict[str, Any]:
    arch, hp = source.arch, source.hparams
    rope = {"rope_type": "default", "rope_theta": hp.rope_theta}
    if hp.rope_scaling:
        rope = {**hp.rope_scaling, "rope_theta": hp.rope_theta}
    return dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=widths.num_attention_heads, num_key_value_heads=widths.num_key_value_heads,
        intermediate_size=widths.intermediate_size, head_dim=arch.head_dim, hidden_act="silu",
        rms_norm_eps=hp.rms_norm_eps, max_position_embeddings=hp.max_position_embeddings,
        rope_parameters=rope, tie_word_embeddings=arch.tie_embeddings, attention_bias=False, mlp_bias=False,
        dtype="float32", **_token_ids(source.tokenizer_dir),
    )


def hf_model(source: ExportSource, padded: bool = False) -> tuple[Any, dict[str, torch.Tensor], str]:
    """(transformers config, HF state dict, kind) for `source`; kind is llama, padded or remote."""
    from transformers import LlamaConfig

    arch = source.arch
    if padded or _plain_llama_fits(arch):
        widths = padded_widths(arch) if padded else PaddedWidths(
            arch.layers[0].num_attention_heads, arch.layers[0].num_query_groups, arch.layers[0].ffn_hidden_size)
        state = dict(source.state)
        if padded:
            for index, layer in enumerate(arch.layers):
                state.update(pad_layer(source.state, index, layer, widths, arch.head_dim))
        config = LlamaConfig(architectures=["LlamaForCausalLM"], **_config_fields(source, widths))
        return config, state, "padded" if padded else "llama"
    from efficientllm.interop.hf_modeling.configuration_efficientllm import EfficientLLMConfig

    widest = PaddedWidths(max(l.num_attention_heads for l in arch.layers), max(l.num_query_groups for l in arch.layers),
                          max(l.ffn_hidden_size for l in arch.layers))
    config = EfficientLLMConfig(
        layer_num_attention_heads=[l.num_attention_heads for l in arch.layers],
        layer_num_key_value_heads=[l.num_query_groups for l in arch.layers],
        layer_intermediate_size=[l.ffn_hidden_size for l in arch.layers],
        architectures=["EfficientLLMForCausalLM"], auto_map=REMOTE_AUTO_MAP, **_config_fields(source, widest),
    )
    return config, dict(source.state), "remote"


def write_hf(source: ExportSource, out_dir: str | Path, *, padded: bool = False) -> Path:
    """Write `source` as a Hugging Face directory `out_dir` (new; written atomically)."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists():
        raise ExportError(f"output {out} already exists; give a new directory")
    config, state, kind = hf_model(source, padded)
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source.tokenizer_dir, tmp)
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        save_torch_state_dict(state, tmp, metadata={"format": "pt"})
        if kind == "remote":
            for name in hf_modeling.FILES:
                shutil.copy(hf_modeling.DIRECTORY / name, tmp / name)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_hf(ckpt: str | Path, out_dir: str | Path, *, padded: bool = False) -> Path:
    """Export a checkpoint (a save directory or an iter_N, saved at any TP/PP) to `out_dir`."""
    from efficientllm.interop.export_source import load_export_source, resolve_checkpoint

    if Path(out_dir).exists():
        raise ExportError(f"output {out_dir} already exists; give a new directory")
    _, meta = resolve_checkpoint(ckpt)
    if padded:
        padded_widths(Architecture.from_dict(meta["architecture"]))  # refuses before any work
    return write_hf(load_export_source(ckpt), out_dir, padded=padded)


def describe(out_dir: Path) -> str:
    """One line for the CLI: what kind of directory was written and how to load it."""
    config = json.loads((out_dir / "config.json").read_text())
    if "auto_map" in config:
        return f"{out_dir}: per-layer widths (EfficientLLMForCausalLM), load with trust_remote_code=True"
    return f"{out_dir}: LlamaForCausalLM ({config['num_attention_heads']} heads, {config['num_key_value_heads']} KV heads, FFN {config['intermediate_size']})"


"""Hugging Face Llama tensors <-> megatron-core GPT shards: names, layouts, TP slices.

megatron's layouts per layer (see pruning/layout.py; t = TP size, rank r):
- `linear_qkv` [(nh + 2*ng)*d, h]: per KV group, its query heads' rows, then its k rows, then
  its v rows; rank r holds groups r*ng/t .. (r+1)*ng/t - 1. HF keeps q_proj / k_proj / v_proj
  apart, heads in order (head j uses KV group j // (nh/ng)). Both use the half-rotation RoPE
  layout (megatron's rotary_interleaved=False), so rows need no permutation.
- `linear_proj` [h, nh*d] = o_proj; a rank holds its heads' columns.
- `linear_fc1` [2f, h] = [gate_proj; up_proj] within each rank's shard of f/t channels.
- `linear_fc2` [h, f] = down_proj; a rank holds its channels' columns.
- embedding / output layer [V, h]: vocab-parallel rows.

Importing, a rank reads only the rows/columns it owns, with `safetensors`' `get_slice`. A model
may be built wider than the checkpoint (fit_to_parallel's all-zero KV groups / FFN channels at
the end of each layer): those rows and columns are zeros.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.interop.errors import ModelImportError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def hf_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Llama with these (per-layer) widths, and its shape."""
    h, d = arch.hidden_size, arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    for i, layer in enumerate(arch.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (layer.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (layer.num_query_groups * d, h),
            p + "self_attn.v_proj.weight": (layer.num_query_groups * d, h),
            p + "self_attn.o_proj.weight": (h, layer.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (layer.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (layer.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, layer.ffn_hidden_size),
        })
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


class SafetensorsWeights:
    """The tensors of a Hugging Face model directory (one model.safetensors, or the shards named
    by model.safetensors.index.json), read slice by slice. Opening checks every file's header,
    so a missing or truncated shard is named before anything is read."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                self.files = {name: self.directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ModelImportError(f"{index} is not a safetensors index: {err}") from None
        elif (self.directory / SINGLE_FILE).is_file():
            self.files = {}
        else:
            raise ModelImportError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE} (safetensors weights)")
        self._open: dict[Path, Any] = {}
        for path in sorted(set(self.files.values())) or [self.directory / SINGLE_FILE]:
            if not path.is_file():
                raise ModelImportError(f"safetensors shard {path} is missing (named by {index})")
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except SafetensorError as err:
                raise ModelImportError(f"safetensors file {path} is truncated or corrupt: {err}") from None
        if not self.files:
            handle = self._open[self.directory / SINGLE_FILE]
            self.files = {name: self.directory / SINGLE_FILE for name in handle.keys()}
        for name, path in self.files.items():
            if name not in self._open[path].keys():
                raise ModelImportError(f"safetensors shard {path} lacks tensor {name} (named by {index})")

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows [a, b) / columns [a, b), as fp32."""
        piece = self._open[self.files[name]].get_slice(name)
        if rows is not None:
            tensor = piece[rows[0]:rows[1]]
        elif cols is not None:
            tensor = piece[:, cols[0]:cols[1]]
        else:
            tensor = piece[:]
        return tensor.float()

    def padded(self, name: str, axis: int, start: int, stop: int) -> torch.Tensor:
        """Rows (axis 0) or columns (axis 1) [start, stop); those past the tensor's end are zeros."""
        shape = list(self.shape(name))
        real = shape[axis]
        shape[axis] = stop - start
        out = torch.zeros(shape)
        if start < real:
            span = (start, min(stop, real))
            part = self.read(name, rows=span) if axis == 0 else self.read(name, cols=span)
            out.narrow(axis, 0, span[1] - span[0]).copy_(part)
        return out


def check_weights(weights: SafetensorsWeights, arch: Architecture) -> None:
    """Every tensor the config implies is there at its shape, and nothing we would ignore is."""
    expected = hf_shapes(arch)
    for name, shape in expected.items():
        if name not in weights.names():
            hint = " (tie_word_embeddings is false but the weights have no lm_head)" if name == "lm_head.weight" else ""
            raise ModelImportError(f"{weights.directory}: tensor {name} is missing{hint}")
        actual = weights.shape(name)
        if actual != shape:
            raise ModelImportError(
                f"{weights.directory}: tensor {name} has shape {list(actual)} but config.json implies {list(shape)} "
                f"(in {weights.files[name].name})"
            )
    tolerated = {"lm_head.weight"} if arch.tie_embeddings else set()  # transformers ties it away
    unexpected = sorted(n for n in weights.names() - set(expected) - tolerated if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ModelImportError(
            f"{weights.directory}: tensor {unexpected[0]} is not part of a bias-free Llama "
            f"({len(unexpected)} unexpected tensors); supported: RMSNorm, SwiGLU, RoPE, GQA, no biases"
        )


# ----- layouts (plain tensor math) -----------------------------------------------------------
def fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """megatron's linear_qkv rows from HF q/k/v rows of the same `groups` KV groups."""
    h = q.shape[-1]
    return torch.cat([q.view(groups, -1, h), k.view(groups, head_dim, h), v.view(groups, head_dim, h)], dim=1).view(-1, h)


def split_qkv(qkv: torch.Tensor, layer: LayerWidths, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF q_proj, k_proj, v_proj from a full (TP=1) linear_qkv."""
    hpg, h = layer.heads_per_group, qkv.shape[-1]
    blocks = qkv.view(layer.num_query_groups, hpg + 2, head_dim, h)
    return blocks[:, :hpg].reshape(-1, h), blocks[:, hpg].reshape(-1, h), blocks[:, hpg + 1].reshape(-1, h)


def megatron_to_hf(state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """A full (TP=1, PP=1) megatron GPTModel state dict under Hugging Face Llama names."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    for i, layer in enumerate(arch.layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[ours + "self_attention.linear_qkv.weight"], layer, arch.head_dim)
        gate, up = state[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            theirs + "input_layernorm.weight": state[ours + "input_layernorm.weight"],
            theirs + "self_attn.q_proj.weight": q,
            theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": state[ours + "self_attention.linear_proj.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "pre_mlp_layernorm.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": state[ours + "mlp.linear_fc2.weight"],
        })
    if not arch.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    # Own storage each: the q/k/v and gate/up halves are views of one fused tensor.
    return {name: tensor.detach().float().clone() for name, tensor in out.items()}


# ----- one rank's shards from the HF tensors -------------------------------------------------
def _layer_shard(weights: SafetensorsWeights, kind: str, layer: int, widths: LayerWidths, head_dim: int,
                 rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of one layer's `kind` (linear_qkv, linear_proj, linear_fc1, linear_fc2),
    for a model built with `widths` (possibly wider than the checkpoint's: zeros there)."""
    p, d = f"model.layers.{layer}.", head_dim
    per_rank = widths.num_query_groups // tp
    g0, g1 = rank * per_rank, (rank + 1) * per_rank
    q_rows = widths.heads_per_group * d
    f_local = widths.ffn_hidden_size // tp
    c0, c1 = rank * f_local, (rank + 1) * f_local
    if kind == "linear_qkv":
        q = weights.padded(p + "self_attn.q_proj.weight", 0, g0 * q_rows, g1 * q_rows)
        k = weights.padded(p + "self_attn.k_proj.weight", 0, g0 * d, g1 * d)
        v = weights.padded(p + "self_attn.v_proj.weight", 0, g0 * d, g1 * d)
        return fused_qkv(q, k, v, per_rank, d)
    if kind == "linear_proj":
        return weights.padded(p + "self_attn.o_proj.weight", 1, g0 * q_rows, g1 * q_rows)
    if kind == "linear_fc1":
        return torch.cat([weights.padded(p + "mlp.gate_proj.weight", 0, c0, c1),
                          weights.padded(p + "mlp.up_proj.weight", 0, c0, c1)])
    if kind == "linear_fc2":
        return weights.padded(p + "mlp.down_proj.weight", 1, c0, c1)
    raise KeyError(kind)


_NORMS = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm"}


def _shard_for(name: str, weights: SafetensorsWeights, arch: Architecture, layer_offset: int,
               rank: int, tp: int) -> torch.Tensor:
    """The tensor a megatron parameter `name` (stage-local layer numbers) holds on this rank."""
    vocab_rows = arch.vocab_size // tp
    vocab = (rank * vocab_rows, (rank + 1) * vocab_rows)
    if name == "embedding.word_embeddings.weight":
        return weights.read("model.embed_tokens.weight", rows=vocab)
    if name == "output_layer.weight":
        return weights.read("model.embed_tokens.weight" if arch.tie_embeddings else "lm_head.weight", rows=vocab)
    if name == "decoder.final_layernorm.weight":
        return weights.read("model.norm.weight")
    parts = name.split(".")  # decoder.layers.{j}.{module}.{sub}.weight
    layer = int(parts[2]) + layer_offset
    if parts[3] in _NORMS:
        return weights.read(f"model.layers.{layer}.{_NORMS[parts[3]]}.weight")
    return _layer_shard(weights, parts[4], layer, arch.layers[layer], arch.head_dim, rank, tp)


def local_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, int]]:
    """(name, parameter, offset of its stage's first layer) of one bare GPTModel chunk."""
    layers = chunk.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    for name, param in chunk.named_parameters():
        yield name, param, offset


@torch.no_grad()
def load_into_chunks(chunks: list[torch.nn.Module], weights: SafetensorsWeights, arch: Architecture) -> None:
    """Copy this rank's slices of the HF tensors into its bare GPTModel chunks, built from `arch`
    at the formed TP/PP layout. Only the owned rows/columns are read from disk."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, param, offset in local_parameters(chunk):
            tensor = _shard_for(name, weights, arch, offset, rank, tp)
            if tuple(tensor.shape) != tuple(param.shape):  # a layout bug, not bad input
                raise RuntimeError(f"{name}: built {list(param.shape)} on TP rank {rank}, read {list(tensor.shape)}")
            param.copy_(tensor)

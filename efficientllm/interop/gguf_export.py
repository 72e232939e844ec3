"""An ExportSource -> one GGUF file for llama.cpp, written with gguf's GGUFWriter.

Uniform models are written as architecture `llama`. A model with per-layer widths is written as
`deci`, which llama.cpp reads with per-layer `attention.head_count`, `attention.head_count_kv`
and `feed_forward_length` arrays. Its graph has traps (FORMATS.md), so shapes it mishandles are
refused, naming the layer, before anything is written:
- a layer 0 without heads: llama.cpp then never reads the head size and the rotary size;
- a layer without FFN channels: its attention output is dropped, not added to the residual;
- a layer with heads but no KV heads: read as Nemotron's "linear attention".
The head size, value size and rotary size are always written, whatever layer 0 holds.

Q and K rows are permuted per head from the half-rotation layout of Hugging Face and megatron
(dimension i pairs with i + d/2) to llama.cpp's rotary layout (2i pairs with 2i + 1).

Llama 3 rope scaling goes in as llama.cpp's `rope_freqs` tensor (one divisor per frequency);
other rope scalings are refused.

dtypes: f32 (exact), f16 (2-D weights in half precision), q8_0 (2-D weights in 8-bit blocks of
32 with one f16 scale: 34 bytes per 32 weights, every row length a multiple of 32). Norm weights
stay f32 in every dtype, as llama.cpp expects.

The file is written under a temporary name in the target directory and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from efficientllm.architecture import Architecture
from efficientllm.atomic import temporary_sibling
from efficientllm.interop.errors import ExportError
from efficientllm.interop.gguf_vocab import read_vocab
from efficientllm.interop.hf_weights import hf_shapes
from efficientllm.interop.source import ExportSource, ModelHparams

GGUF_DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]


def gguf_architecture(arch: Architecture) -> gguf.MODEL_ARCH:
    return gguf.MODEL_ARCH.LLAMA if arch.is_uniform else gguf.MODEL_ARCH.DECI


def check_gguf_shapes(arch: Architecture, hparams: ModelHparams, dtype: str) -> None:
    """Raise ExportError naming the first dtype, layer or hyper-parameter GGUF/llama.cpp cannot
    take: checks that need no weights, so a checkpoint is refused before it is loaded."""
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not a GGUF dtype this exporter writes; valid: {', '.join(GGUF_DTYPES)}")
    for i, layer in enumerate(arch.layers):
        if i == 0 and layer.num_attention_heads == 0:
            raise ExportError("layer 0 has no attention heads: llama.cpp's deci reads the head size and rotary size only from a layer 0 with heads")
        if layer.ffn_hidden_size == 0:
            raise ExportError(f"layer {i} has no FFN channels: llama.cpp's deci graph then drops that layer's attention output")
        if layer.num_attention_heads > 0 and layer.num_query_groups == 0:
            raise ExportError(f"layer {i} has {layer.num_attention_heads} heads but no KV heads: llama.cpp's deci reads that as linear attention")
        if layer.num_attention_heads == 0:
            raise ExportError(f"layer {i} has no attention heads: attention-free layers are not exported")
    if arch.head_dim % 2:
        raise ExportError(f"head_dim {arch.head_dim} is odd: rotary embeddings pair the dimensions of a head")
    arch.validate()
    scaling = hparams.rope_scaling
    if scaling is not None and _rope_type(scaling) != "llama3":
        raise ExportError(f"rope_scaling of type {_rope_type(scaling)!r} cannot be exported to GGUF; supported: none, llama3")
    if dtype == "q8_0":
        _check_q8_0_rows(arch)


def _check_tensors(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name not in state:
            raise ExportError(f"tensor {name} is missing from the export source (expected shape {list(shape)})")
        if tuple(state[name].shape) != shape:
            raise ExportError(f"tensor {name} has shape {list(state[name].shape)}, but the architecture needs {list(shape)}")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ExportError(f"tensor {extra[0]} has no place in a Llama GGUF file (biases and other extras are not supported)")


def _check_q8_0_rows(arch: Architecture) -> None:
    """Q8_0 quantises each row in blocks of 32: every row length (a matrix's input width) must divide."""
    widths = [("", "hidden_size", arch.hidden_size, "every matrix but attn_output and ffn_down")]
    for i, layer in enumerate(arch.layers):
        widths.append((f"layer {i}: ", "heads x head_dim", layer.num_attention_heads * arch.head_dim, "attn_output"))
        widths.append((f"layer {i}: ", "ffn_hidden_size", layer.ffn_hidden_size, "ffn_down"))
    for where, field, width, matrices in widths:
        if width % _Q8_0_BLOCK:
            raise ExportError(
                f"{where}{field} {width} (the row length of {matrices}) is not a multiple of "
                f"{_Q8_0_BLOCK}, the q8_0 block size; export this model with --dtype f16 or f32"
            )


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; give a .gguf file path")
    if not out.parent.is_dir():
        raise ExportError(f"output directory {out.parent} does not exist")


def export_checkpoint_gguf(ckpt: str | Path, out_path: str | Path, dtype: str = "f32") -> Path:
    """`efficientllm export gguf`: a checkpoint (a save directory or an iter_N, saved at any
    TP/PP) to a GGUF file. Shapes, tokenizer and output are checked from the checkpoint's
    metadata before its weights are loaded."""
    from efficientllm.interop.export_source import load_export_source, resolve_checkpoint
    from efficientllm.interop.hf_config import hparams_from_model_config
    from efficientllm.training.checkpoint import checkpoint_tokenizer

    found, meta = resolve_checkpoint(ckpt)
    arch = Architecture.from_dict(meta["architecture"])
    check_gguf_shapes(arch, hparams_from_model_config(meta["config"].get("model", {}), meta["seq_length"]), dtype)
    read_vocab(checkpoint_tokenizer(found), arch.vocab_size)
    _check_output(Path(out_path))
    return export_gguf(load_export_source(found), out_path, dtype)


def export_gguf(source: ExportSource, out_path: str | Path, dtype: str = "f32") -> Path:
    """Write `source` as a GGUF file at `out_path` (atomically) and return its path."""
    check_gguf_shapes(source.arch, source.hparams, dtype)
    _check_tensors(source.state, hf_shapes(source.arch))
    vocab = read_vocab(source.tokenizer_dir, source.arch.vocab_size)
    out = Path(out_path)
    _check_output(out)
    tmp = temporary_sibling(out)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf_architecture(source.arch)])
        _add_hparams(writer, source, dtype)
        vocab.add_to(writer)
        for name, data, raw_dtype in _tensors(source, dtype):
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def describe_gguf(path: Path) -> str:
    """One line for the CLI: what was written and how big it is."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    file_type = gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name
    params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    return f"{path}: GGUF {arch}, {file_type}, {params:,} parameters, {path.stat().st_size / 2**20:.1f} MiB"


def _add_hparams(writer: gguf.GGUFWriter, source: ExportSource, dtype: str) -> None:
    arch, hp = source.arch, source.hparams

    def per_layer(field: str) -> int | list[int]:
        values = [getattr(layer, field) for layer in arch.layers]
        return values[0] if arch.is_uniform else values

    writer.add_context_length(hp.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(per_layer("ffn_hidden_size"))
    writer.add_head_count(per_layer("num_attention_heads"))
    writer.add_head_count_kv(per_layer("num_query_groups"))
    # llama.cpp derives these from layer 0 unless they are given (deci: only when it has heads).
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_file_type(_FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_type(scaling: dict) -> str | None:
    return scaling.get("rope_type", scaling.get("type"))


def _llama3_rope_factors(source: ExportSource) -> np.ndarray:
    """llama.cpp applies Llama 3 rope scaling as per-frequency divisors (the `rope_freqs` tensor):
    the unscaled inverse frequencies over the scaled ones, both as transformers computes them."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {k: v for k, v in source.hparams.rope_scaling.items() if k != "type"}
    config = LlamaConfig(
        hidden_size=source.arch.hidden_size, head_dim=source.arch.head_dim,
        max_position_embeddings=source.hparams.max_position_embeddings,
        rope_parameters={**scaling, "rope_type": "llama3", "rope_theta": source.hparams.rope_theta},
    )
    unscaled, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (unscaled / scaled).to(torch.float32).numpy()


def _to_llama_cpp_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from half-rotation (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    rows, cols = weight.shape
    d = rows // heads
    return weight.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _encode(data: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    if data.ndim == 1 or dtype == "f32":
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _tensors(source: ExportSource, dtype: str) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]]:
    arch = source.arch
    if source.hparams.rope_scaling is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(source), None
    names = gguf.get_tensor_name_map(gguf_architecture(arch), arch.num_layers)
    for hf_name in hf_shapes(arch):
        data = source.state[hf_name].detach().to(torch.float32).contiguous().numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            layer = arch.layers[int(hf_name.split(".")[2])]
            heads = layer.num_attention_heads if "q_proj" in hf_name else layer.num_query_groups
            data = _to_llama_cpp_rotary(data, heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        encoded, raw_dtype = _encode(data, dtype)
        yield gguf_name, encoded, raw_dtype

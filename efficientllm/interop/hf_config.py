"""Hugging Face `config.json` <-> our Architecture, hyper-parameters and run config.

In: a Llama-family config is checked (one line naming what is not supported and listing what is)
and read into an Architecture (the model's own widths) and ModelHparams. `fit_to_parallel`
checks those widths against a TP/PP layout, or pads them with all-zero KV groups / FFN channels
when asked. `resolve_from_hf` fills a run config's model section from `model.from_hf`.
Out: `hparams_from_checkpoint` reads the same hyper-parameters back from a checkpoint's metadata
for the exporters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficientllm.architecture import Architecture, ArchitectureError, LayerWidths, model_shape_fields
from efficientllm.interop.errors import ModelImportError
from efficientllm.interop.source import ModelHparams

if TYPE_CHECKING:
    from efficientllm.config import Config

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # the config.json model_type of each, in order
SUPPORTED = ("LlamaForCausalLM (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama) and MistralForCausalLM without "
             "sliding window: RMSNorm, SwiGLU (silu), RoPE, GQA, no biases, tied or untied embeddings")
# Why some well-known neighbours are refused, so the message says more than "not supported".
_REFUSED_BECAUSE = {
    "Qwen2ForCausalLM": "it has q/k/v projection biases",
    "Qwen3ForCausalLM": "it normalises q and k per head",
    "MixtralForCausalLM": "it is a mixture of experts",
    "Qwen2MoeForCausalLM": "it is a mixture of experts",
    "GemmaForCausalLM": "it uses GeGLU and scaled embeddings",
    "Gemma2ForCausalLM": "it uses GeGLU, soft-capping and sliding windows",
    "PhiForCausalLM": "it has biases and a parallel attention/MLP block",
}
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# megatron-core 0.16's Llama 3 RoPE scaling takes only the factor; these are fixed in its formula
# (RotaryEmbedding._apply_scaling), which is the one transformers computes for rope_type llama3.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class HFModelSpec:
    """A checked Hugging Face model directory: its shapes and hyper-parameters."""

    directory: Path
    arch: Architecture  # the model's own widths (before any padding to a TP size)
    hparams: ModelHparams


def _raw_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise ModelImportError(f"Hugging Face model directory {directory} does not exist")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelImportError(f"{path} is missing: {directory} is not a Hugging Face model directory") from None
    except json.JSONDecodeError as err:
        raise ModelImportError(f"{path} is not valid JSON: {err}") from None


def _check_architecture(raw: dict[str, Any], path: Path) -> None:
    names, model_type = raw.get("architectures") or [], raw.get("model_type")
    supported = SUPPORTED_ARCHITECTURES[SUPPORTED_MODEL_TYPES.index(model_type)] if model_type in SUPPORTED_MODEL_TYPES else None
    if names == [supported] or (not names and supported):
        return
    name = ", ".join(names) or f"model_type {model_type!r}"
    why = f" ({_REFUSED_BECAUSE[names[0]]})" if names and names[0] in _REFUSED_BECAUSE else ""
    raise ModelImportError(f"{path}: architecture {name}{why} is not supported; supported: {SUPPORTED}")


def _refuse(path: Path, what: str) -> None:
    raise ModelImportError(f"{path}: {what} is not supported; supported: {SUPPORTED}")


def _rope(config: Any, path: Path) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the rope scaling record (None when plain RoPE)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if theta != int(theta):
        _refuse(path, f"a non-integral rope_theta {theta} (megatron-core's rotary_base is an integer)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        _refuse(path, f"rope scaling of type {rope_type!r} (only Llama 3's 'llama3' scaling)")
    different = {k: params.get(k) for k, v in MEGATRON_LLAMA3_ROPE.items() if float(params.get(k, -1)) != v}
    if different:
        _refuse(path, f"llama3 rope scaling with {different} (megatron-core computes it with {MEGATRON_LLAMA3_ROPE})")
    return theta, {"rope_type": "llama3", "factor": float(params["factor"]), **MEGATRON_LLAMA3_ROPE}


def read_hf_config(directory: str | Path) -> HFModelSpec:
    """Check a Hugging Face model directory's config and read its shapes and hyper-parameters."""
    directory = Path(directory)
    path = directory / "config.json"
    _check_architecture(_raw_config(directory), path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers' validation errors come in many types
        raise ModelImportError(f"{path} is not a valid config: {err}".splitlines()[0]) from None
    if config.hidden_act != "silu":
        _refuse(path, f"hidden_act {config.hidden_act!r} (SwiGLU needs silu)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(config, field, False):
            _refuse(path, f"{field}=true (biases)")
    if getattr(config, "sliding_window", None) is not None or getattr(config, "use_sliding_window", False):
        _refuse(path, f"sliding_window={config.sliding_window} (sliding-window attention)")
    for field in _MOE_FIELDS:
        if getattr(config, field, None):
            _refuse(path, f"{field}={getattr(config, field)} (mixture of experts)")
    theta, rope_scaling = _rope(config, path)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 2:
        _refuse(path, f"an odd head_dim {head_dim} (RoPE rotates pairs)")
    layer = LayerWidths(heads, config.num_key_value_heads or heads, config.intermediate_size)
    try:
        arch = Architecture(config.hidden_size, config.vocab_size, head_dim, (layer,) * config.num_hidden_layers,
                            bool(config.tie_word_embeddings))
        arch.validate()
    except ArchitectureError as err:
        raise ModelImportError(f"{path}: {err}") from None
    hparams = ModelHparams(theta, float(config.rms_norm_eps), int(config.max_position_embeddings), rope_scaling)
    return HFModelSpec(directory, arch, hparams)


def fit_to_parallel(arch: Architecture, tensor_parallel_size: int, pipeline_parallel_size: int,
                    pad: bool = False) -> Architecture:
    """The Architecture to build at this layout: `arch` itself when TP divides every width;
    with `pad`, each layer gets all-zero KV groups (whole groups, same heads per group) and FFN
    channels up to the next multiple of TP, which leaves the logits unchanged. Otherwise a
    ModelImportError names the first layer that does not divide."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if arch.num_layers % pp:
        raise ModelImportError(f"the model's {arch.num_layers} layers are not divisible by pipeline_model_parallel_size {pp}")
    if arch.vocab_size % tp:
        raise ModelImportError(f"vocab_size {arch.vocab_size} is not divisible by tensor_model_parallel_size {tp}")
    up = lambda width: -(-width // tp) * tp
    layers = []
    for index, layer in enumerate(arch.layers):
        groups, ffn = up(layer.num_query_groups), up(layer.ffn_hidden_size)
        if (groups, ffn) != (layer.num_query_groups, layer.ffn_hidden_size) and not pad:
            field, width = (("num_key_value_heads", layer.num_query_groups) if groups != layer.num_query_groups
                            else ("intermediate_size", layer.ffn_hidden_size))
            raise ModelImportError(
                f"layer {index}: {field} {width} is not divisible by tensor_model_parallel_size {tp}; use a TP "
                f"size in {arch.valid_tensor_parallel_sizes()} or pad with all-zero groups (exact): "
                f"model.from_hf_pad_to_tp=true / import --pad-to-tp"
            )
        layers.append(LayerWidths(groups * layer.heads_per_group, groups, ffn))
    return dataclasses.replace(arch, layers=tuple(layers))


def model_fields(arch: Architecture, hparams: ModelHparams, directory: str | Path) -> dict[str, Any]:
    """The run config's model section that builds `arch` with these hyper-parameters."""
    rope = hparams.rope_scaling
    return {
        **model_shape_fields(arch),
        "rotary_base": int(hparams.rope_theta),
        "norm_epsilon": hparams.rms_norm_eps,
        "use_rope_scaling": rope is not None,
        "rope_scaling_factor": rope["factor"] if rope else 8.0,
        "max_position_embeddings": hparams.max_position_embeddings,
        "from_hf": str(directory),
    }


def resolve_from_hf(config: "Config") -> "Config":
    """`config` with its model section read from `model.from_hf` (a copy; unchanged without it),
    padded to the TP size when `model.from_hf_pad_to_tp`; the model's tokenizer is the default."""
    m = config.model
    if not m.from_hf:
        return config
    spec = read_hf_config(m.from_hf)
    p = config.parallel
    stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
    arch = fit_to_parallel(spec.arch, p.tensor_model_parallel_size, stages, m.from_hf_pad_to_tp)
    model = dataclasses.replace(m, **model_fields(arch, spec.hparams, m.from_hf))
    data = config.data if config.data.tokenizer_model else dataclasses.replace(config.data, tokenizer_model=str(m.from_hf))
    return dataclasses.replace(config, model=model, data=data)


def hparams_from_model_config(model: dict[str, Any], seq_length: int) -> ModelHparams:
    """The hyper-parameters a run config's model section (e.g. a checkpoint's copy) builds with."""
    defaults = ModelHparams()
    scaling = None
    if model.get("use_rope_scaling"):
        scaling = {"rope_type": "llama3", "factor": float(model["rope_scaling_factor"]), **MEGATRON_LLAMA3_ROPE}
    return ModelHparams(
        rope_theta=float(model.get("rotary_base", defaults.rope_theta)),
        rms_norm_eps=float(model.get("norm_epsilon", defaults.rms_norm_eps)),
        max_position_embeddings=int(model.get("max_position_embeddings") or seq_length),
        rope_scaling=scaling,
    )

"""A checkpoint saved at any TP/PP -> an ExportSource: the whole model as fp32 tensors under
Hugging Face Llama names, its hyper-parameters and its tokenizer directory.

The model is built from the checkpoint's Architecture at TP1 PP1 in this one process and its
shards are loaded with `checkpoint.load_model_weights` (megatron's dist_checkpointing reshards
them), so every exporter sees the same tensors whatever layout the run used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficientllm.architecture import Architecture
from efficientllm.interop.hf_config import hparams_from_model_config
from efficientllm.interop.hf_weights import megatron_to_hf
from efficientllm.interop.local_group import single_process_group
from efficientllm.interop.source import ExportSource
from efficientllm.model import ModelOptions, build_model_chunks
from efficientllm.training import checkpoint


def resolve_checkpoint(ckpt: str | Path) -> tuple[Path, dict[str, Any]]:
    """The iter_N directory `ckpt` names (a save directory's newest complete one, or itself) and
    its verified metadata; nothing is loaded."""
    found = checkpoint.find_checkpoint(ckpt)
    if found is None:
        raise checkpoint.CheckpointError(f"no checkpoint in {ckpt}; give a save directory or an iter_N directory")
    return found, checkpoint.verify(found)


def load_export_source(ckpt: str | Path) -> ExportSource:
    """`ckpt`: a save directory (its newest complete checkpoint) or one iter_N directory."""
    found, meta = resolve_checkpoint(ckpt)
    arch = Architecture.from_dict(meta["architecture"])
    hparams = hparams_from_model_config(meta["config"].get("model", {}), meta["seq_length"])
    tokenizer_dir = checkpoint.checkpoint_tokenizer(found)
    options = ModelOptions(
        seq_length=meta["seq_length"],
        rotary_base=int(hparams.rope_theta),
        norm_epsilon=hparams.rms_norm_eps,
        rope_scaling_factor=hparams.rope_scaling["factor"] if hparams.rope_scaling else None,
    )
    with single_process_group():
        chunks = build_model_chunks(arch, options)
        checkpoint.load_model_weights(chunks, found)
        state = {name: tensor.cpu() for name, tensor in chunks[0].state_dict().items()
                 if not name.endswith("_extra_state")}
    info = {"checkpoint": str(found), "iteration": meta["iteration"], "consumed_tokens": meta["consumed_tokens"],
            **({"provenance": meta["provenance"]} if "provenance" in meta else {})}
    return ExportSource(arch, hparams, megatron_to_hf(state, arch), tokenizer_dir, info)

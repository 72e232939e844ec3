"""Hugging Face export: transformers reads back what we trained. SmolLM2 round-trips as a plain
Llama; a model pruned at TP2 PP2 exports as our remote-code model and as a zero-padded plain
Llama, both with our logits (fp32, max |Δlogit| <= 1e-4) and our greedy continuation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.interop.errors import ExportError
from efficientllm.interop.hf_export import export_hf, write_hf
from efficientllm.interop.source import ExportSource, ModelHparams
from efficientllm.training import checkpoint
from efficientllm.training.checkpoint import load_tokenizer_from
from tests.distributed.conftest import TINY_MODEL, tiny_corpus, train_on_ranks  # noqa: F401 (fixture)
from tests.interop.conftest import greedy_decode, hf_logits, megatron_logits, megatron_model

TOLERANCE = 1e-4  # max |Δlogit| in fp32
PROMPT = "def main(argv):\n    "


def test_smollm2_round_trips_to_a_plain_llama_with_the_source_logits(smollm2_checkpoint, smollm2_tokens,
                                                                     smollm2_reference_logits, tmp_path):
    out = export_hf(smollm2_checkpoint, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert (config["rope_parameters"]["rope_theta"], config["max_position_embeddings"]) == (100000.0, 8192)
    exported = hf_logits(out, smollm2_tokens)
    assert (exported - smollm2_reference_logits).abs().max() <= TOLERANCE


@pytest.fixture(scope="module")
def pruned_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny model trained and pruned at TP2 PP2 by the real training loop (per-layer widths)."""
    root = tmp_path_factory.mktemp("pruned")
    config = {
        "run_dir": str(root / "run"),
        # a heterogeneous source (per-layer heads), pruned on by saliency
        "model": {**TINY_MODEL, "layers": [{"num_attention_heads": h, "num_query_groups": 2, "ffn_hidden_size": 128}
                                           for h in (8, 4, 6, 4)]},
        "data": {"data_path": [tiny_corpus["train"]], "valid_data_path": [tiny_corpus["valid"]],
                 "tokenizer_model": tiny_corpus["tokenizer"], "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 4, "lr_warmup_iters": 1,
                     "log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "checkpoint": {"save": str(root / "ckpt")},
        "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
        "prune": {"enabled": True, "target_ratio": 0.6, "start_step": 2, "end_step": 3, "min_hidden": 16, "align": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    train_on_ranks(4, root / "config.yaml", root / "out", timeout=240)
    return root / "ckpt"


@pytest.fixture(scope="module")
def ours(pruned_checkpoint, single_rank):
    """Our pruned model at TP1 PP1 in this process, and a prompt in its tokenizer."""
    model = megatron_model(pruned_checkpoint)
    tokenizer = load_tokenizer_from(pruned_checkpoint)
    return model, tokenizer, tokenizer.tokenize(PROMPT)


def test_the_pruned_checkpoint_has_per_layer_heads_and_ffn_widths(pruned_checkpoint):
    meta = checkpoint.verify(checkpoint.find_checkpoint(pruned_checkpoint))
    layers = Architecture.from_dict(meta["architecture"]).layers
    assert len({l.num_attention_heads for l in layers}) > 1 and len({l.ffn_hidden_size for l in layers}) > 1


def test_pruned_model_exports_as_remote_code_with_our_logits_and_greedy_tokens(pruned_checkpoint, ours, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, prompt = ours
    out = export_hf(pruned_checkpoint, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    arch = Architecture.from_dict(checkpoint.read_meta(checkpoint.find_checkpoint(pruned_checkpoint))["architecture"])
    assert config["layer_num_attention_heads"] == [l.num_attention_heads for l in arch.layers]
    assert config["layer_intermediate_size"] == [l.ffn_hidden_size for l in arch.layers]
    assert "AutoModelForCausalLM" in config["auto_map"]
    tokens = torch.tensor([prompt])
    exported = hf_logits(out, tokens, trust_remote_code=True)
    assert (exported - megatron_logits(model, tokens)).abs().max() <= TOLERANCE
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
    generated = hf.generate(tokens, max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert generated == greedy_decode(model, prompt, 16, tokenizer.eod)


def test_pruned_model_exports_padded_as_a_plain_llama_with_our_logits(pruned_checkpoint, ours, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, prompt = ours
    out = export_hf(pruned_checkpoint, tmp_path / "hf", padded=True)
    config = json.loads((out / "config.json").read_text())
    arch = Architecture.from_dict(checkpoint.read_meta(checkpoint.find_checkpoint(pruned_checkpoint))["architecture"])
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["intermediate_size"] == max(l.ffn_hidden_size for l in arch.layers)
    assert config["num_attention_heads"] >= max(l.num_attention_heads for l in arch.layers)
    tokens = torch.tensor([prompt])
    assert (hf_logits(out, tokens) - megatron_logits(model, tokens)).abs().max() <= TOLERANCE
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    generated = hf.generate(tokens, max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert generated == greedy_decode(model, prompt, 16, tokenizer.eod)


def test_the_exported_tokenizer_gives_our_ids(pruned_checkpoint, ours, tmp_path):
    from transformers import AutoTokenizer

    _, tokenizer, prompt = ours
    out = export_hf(pruned_checkpoint, tmp_path / "hf")
    # the config names our remote code, so transformers asks for trust_remote_code here too
    assert AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)(PROMPT)["input_ids"] == prompt


def _source(arch: Architecture, tokenizer_dir: Path) -> ExportSource:
    from efficientllm.interop.hf_weights import hf_shapes

    state = {name: torch.zeros(shape) for name, shape in hf_shapes(arch).items()}
    return ExportSource(arch, ModelHparams(), state, tokenizer_dir)


def test_a_padding_no_plain_llama_can_express_is_refused_before_writing(code_tokenizer_dir, tmp_path):
    # hidden 31 is prime: no head count of two or more heads per KV group divides it
    arch = Architecture(31, 512, 8, (LayerWidths(4, 2, 16), LayerWidths(2, 1, 16)))
    with pytest.raises(ExportError, match="divides hidden_size 31.*without --padded"):
        write_hf(_source(arch, code_tokenizer_dir), tmp_path / "out", padded=True)
    assert list(tmp_path.iterdir()) == []


def test_a_hidden_size_no_layer_s_heads_divide_exports_as_remote_code(code_tokenizer_dir, tmp_path):
    """Hidden pruning leaves any hidden size (SmolLM2 at align 128: 512 with 9 heads), which
    LlamaConfig's own validator refuses; our config, with head_dim explicit, takes it."""
    from transformers import AutoModelForCausalLM

    arch = Architecture(30, 512, 8, (LayerWidths(4, 2, 16), LayerWidths(8, 4, 24)))
    out = write_hf(_source(arch, code_tokenizer_dir), tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
    assert (model.config.hidden_size, model.config.head_dim) == (30, 8)
    assert model.config.layer_num_attention_heads == [4, 8] and model.config.layer_intermediate_size == [16, 24]
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)


def test_an_existing_output_directory_is_refused(pruned_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_hf(pruned_checkpoint, tmp_path / "out")

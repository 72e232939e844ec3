"""Hugging Face models imported into our checkpoints give transformers' own logits (fp32, max
|Δlogit| <= 1e-4), whatever their GQA, embeddings, head_dim, rope_theta or Llama 3 RoPE scaling."""

from __future__ import annotations

import json

import pytest
import torch

from efficientllm.interop.errors import ModelImportError
from efficientllm.interop.hf_config import read_hf_config
from efficientllm.interop.hf_import import import_hf, load_hf_weights
from efficientllm.training import checkpoint
from tests.interop.conftest import hf_logits, make_tiny_llama, megatron_logits, megatron_model

TOLERANCE = 1e-4  # max |Δlogit| in fp32


def test_imported_smollm2_gives_transformers_logits(smollm2_checkpoint, smollm2_tokens, smollm2_reference_logits):
    ours = megatron_logits(megatron_model(smollm2_checkpoint), smollm2_tokens)
    assert ours.shape == smollm2_reference_logits.shape
    assert (ours - smollm2_reference_logits).abs().max() <= TOLERANCE


def test_the_imported_checkpoint_records_iteration_0_the_hyperparameters_and_its_tokenizer(smollm2_checkpoint):
    meta = checkpoint.verify(checkpoint.find_checkpoint(smollm2_checkpoint))
    model = meta["config"]["model"]
    assert meta["iteration"] == 0 and meta["weights_only"]
    assert (model["rotary_base"], model["max_position_embeddings"]) == (100000, 8192)
    assert model["norm_epsilon"] == pytest.approx(1e-5)
    layer = meta["architecture"]["layers"][0]
    assert (layer["num_attention_heads"], layer["num_query_groups"], layer["ffn_hidden_size"]) == (9, 3, 1536)
    assert meta["architecture"]["tie_embeddings"] and "tokenizer/tokenizer.json" in json.loads(
        (checkpoint.find_checkpoint(smollm2_checkpoint) / checkpoint.MANIFEST).read_text())["files"]


def test_a_random_llama_with_gqa_untied_embeddings_wide_heads_and_rope_theta_gives_its_logits(
        tiny_llama_dir, single_rank, tmp_path):
    spec = read_hf_config(tiny_llama_dir)
    assert spec.arch.head_dim * spec.arch.layers[0].num_attention_heads != spec.arch.hidden_size
    assert not spec.arch.tie_embeddings and spec.hparams.rope_theta == 50000.0
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = megatron_logits(megatron_model(import_hf(tiny_llama_dir, tmp_path / "ckpt")), tokens)
    assert (ours - hf_logits(tiny_llama_dir, tokens)).abs().max() <= TOLERANCE


def test_llama3_rope_scaling_gives_transformers_logits(code_tokenizer_dir, single_rank, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    scaled = make_tiny_llama(tmp_path / "scaled", code_tokenizer_dir, rope_parameters=rope, max_position_embeddings=16384)
    plain = make_tiny_llama(tmp_path / "plain", code_tokenizer_dir, max_position_embeddings=16384,
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    tokens = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(scaled, tokens)
    assert (reference - hf_logits(plain, tokens)).abs().max() > 100 * TOLERANCE  # the scaling shows
    ours = megatron_logits(megatron_model(import_hf(scaled, tmp_path / "ckpt")), tokens)
    assert (ours - reference).abs().max() <= TOLERANCE


def test_llama3_rope_scaling_megatron_cannot_compute_is_refused(code_tokenizer_dir, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = make_tiny_llama(tmp_path / "hf", code_tokenizer_dir, rope_parameters=rope, max_position_embeddings=16384)
    with pytest.raises(ModelImportError, match="low_freq_factor.*2.0.*megatron-core computes it with"):
        read_hf_config(model)


def test_checkpoint_load_of_an_imported_checkpoint_starts_from_its_weights(tiny_llama_dir, single_rank, tmp_path):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.config import Config
    from efficientllm.training.trainer import Trainer

    imported = import_hf(tiny_llama_dir, tmp_path / "ckpt")
    config = Config(run_dir=str(tmp_path / "run"))
    config.model.from_hf = str(tiny_llama_dir)
    config.training.micro_batch_size = config.training.global_batch_size = 2
    trainer = Trainer(config, single_rank)  # model section filled from the HF config
    trainer.dp_rank, trainer.dp_size = 0, 1
    arch = architecture_from_config(trainer.config, 512)
    trainer.build_model(arch)
    meta = checkpoint.load(trainer, checkpoint.find_checkpoint(imported))
    assert meta["weights_only"] and trainer.state.iteration == 0
    expected = [chunk.module for chunk in trainer.model]
    loaded = {n: p.detach().clone() for n, p in expected[0].named_parameters()}
    with torch.no_grad():
        for p in expected[0].parameters():
            p.zero_()
    load_hf_weights(expected, tiny_llama_dir, arch)
    for name, param in expected[0].named_parameters():
        assert torch.equal(param, loaded[name]), name

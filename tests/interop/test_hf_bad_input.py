"""Bad Hugging Face input is refused in one line that names the field, tensor, file or layer (and
what is supported), before any work, leaving no output directory behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from efficientllm import cli, distributed
from efficientllm.config import Config
from efficientllm.interop.errors import ModelImportError
from efficientllm.interop.hf_import import import_hf
from tests.interop.conftest import make_tiny_llama


def _variant(source: Path, root: Path, **config_changes) -> Path:
    """A copy of an HF directory with some config.json fields changed."""
    copy = root / "hf"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(config_changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _refused(hf_dir: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(ModelImportError, match=match):
        import_hf(hf_dir, out, **kwargs)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "no output may be left behind"


@pytest.mark.parametrize("changes, match", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
     r"Qwen2ForCausalLM \(it has q/k/v projection biases\) is not supported; supported: LlamaForCausalLM"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "mixture of experts"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096},
     "sliding_window=4096 .sliding-window attention. is not supported"),
    ({"attention_bias": True}, r"attention_bias=true \(biases\) is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' .SwiGLU needs silu. is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope scaling of type 'yarn'"),
])
def test_an_unsupported_model_is_refused_naming_what_and_listing_the_supported(tiny_llama_dir, tmp_path, changes, match):
    _refused(_variant(tiny_llama_dir, tmp_path, **changes), tmp_path / "out", match)


def test_a_config_whose_shapes_disagree_with_the_weights_names_the_tensor(tiny_llama_dir, tmp_path):
    hf = _variant(tiny_llama_dir, tmp_path, intermediate_size=128)
    _refused(hf, tmp_path / "out",
             r"tensor model.layers.0.mlp.gate_proj.weight has shape \[96, 64\] but config.json implies \[128, 64\]")


def _sharded(source: Path, root: Path) -> Path:
    """The model re-saved as several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    copy = root / "sharded"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    AutoModelForCausalLM.from_pretrained(str(source)).save_pretrained(str(copy), max_shard_size="100KB")
    assert (copy / "model.safetensors.index.json").is_file()
    return copy


def test_a_missing_shard_is_named(tiny_llama_dir, tmp_path):
    hf = _sharded(tiny_llama_dir, tmp_path)
    victim = sorted(hf.glob("model-*.safetensors"))[1]
    victim.unlink()
    _refused(hf, tmp_path / "out", f"shard {victim} is missing")


def test_a_truncated_shard_is_named(tiny_llama_dir, tmp_path):
    hf = _sharded(tiny_llama_dir, tmp_path)
    victim = sorted(hf.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    _refused(hf, tmp_path / "out", f"safetensors file {victim} is truncated or corrupt")


def test_untied_weights_without_an_lm_head_are_refused(tiny_llama_dir, tmp_path):
    hf = _variant(tiny_llama_dir, tmp_path)
    state = load_file(hf / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    _refused(hf, tmp_path / "out", "lm_head.weight is missing .tie_word_embeddings is false")


def test_a_bias_the_config_does_not_mention_is_refused(tiny_llama_dir, tmp_path):
    import torch

    hf = _variant(tiny_llama_dir, tmp_path)
    state = load_file(hf / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    _refused(hf, tmp_path / "out", "q_proj.bias is not part of a bias-free Llama")


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(code_tokenizer_dir, tmp_path):
    hf = make_tiny_llama(tmp_path / "small_vocab", code_tokenizer_dir, vocab_size=256)
    _refused(hf, tmp_path / "out", "has 512 tokens but the model's vocab_size is 256")


def test_a_tp_size_that_does_not_divide_a_layer_is_refused_naming_the_layer(tiny_llama_dir, tmp_path):
    _refused(tiny_llama_dir, tmp_path / "out",
             "layer 0: num_key_value_heads 2 is not divisible by tensor_model_parallel_size 4.*pad-to-tp", tp=4)
    _refused(tiny_llama_dir, tmp_path / "out", "2 layers are not divisible by pipeline_model_parallel_size 3", pp=3)


def test_a_run_config_with_from_hf_at_a_tp_that_does_not_divide_stops_before_any_group(tiny_llama_dir):
    from efficientllm.training.trainer import Trainer

    config = Config()
    config.model.from_hf = str(tiny_llama_dir)
    config.parallel.tensor_model_parallel_size = 4
    launch = distributed.LaunchEnv(0, 4, 0, "127.0.0.1", 1, "torchrun")
    with pytest.raises(ModelImportError, match="layer 0: num_key_value_heads 2"):
        Trainer(config, launch)


def test_an_existing_output_is_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelImportError, match="already exists"):
        import_hf(tiny_llama_dir, tmp_path / "out")


def test_the_cli_prints_one_line_and_exits_2(tiny_llama_dir, tmp_path, capsys):
    hf = _variant(tiny_llama_dir, tmp_path, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    assert cli.main(["import", "hf", str(hf), str(tmp_path / "out")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("efficientllm: error: ") and err.count("\n") == 1 and "Qwen2ForCausalLM" in err

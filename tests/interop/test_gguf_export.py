"""GGUF export of small models: what the file says, what each dtype stores, what llama.cpp and
transformers read back from it, and the bad input it refuses before writing anything."""

from __future__ import annotations

import dataclasses
import glob
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from efficientllm.architecture import Architecture, LayerWidths
from efficientllm.data.tokenizer import load_tokenizer, train_tokenizer
from efficientllm.interop.errors import ExportError
from efficientllm.interop.gguf_export import GGUF_DTYPES, export_gguf
from efficientllm.interop.hf_weights import hf_shapes
from efficientllm.interop.source import ExportSource, ModelHparams
from efficientllm.training import checkpoint
from tests.interop.gguf_support import Ours, require_llamacpp

VOCAB = 512
HETEROGENEOUS = Architecture(
    hidden_size=64, vocab_size=VOCAB, head_dim=16, tie_embeddings=False,
    layers=(LayerWidths(4, 2, 96), LayerWidths(2, 1, 64), LayerWidths(4, 4, 32)),
)
UNIFORM = Architecture.uniform(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=96, vocab_size=VOCAB, tie_embeddings=True)
CODE = "def f(x):\n    return  x * 2  # ünïcode, 12345\n\n\nclass A:\n\tpass\n"


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """Our own kind of tokenizer: sentencepiece BPE with byte fallback, trained on stdlib code."""
    root = tmp_path_factory.mktemp("spm")
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/*.py"))
    # VOCAB - 12 pieces: the model's vocab is padded past the tokenizer's, as for TP.
    tokenizer = train_tokenizer(files, root / "trained.model", vocab_size=VOCAB - 12)
    return tokenizer.save(root / "tokenizer")  # the files a checkpoint carries


def random_source(arch: Architecture, tokenizer_dir: Path, seed: int = 0) -> ExportSource:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(arch).items():
        if len(shape) == 1:  # norm weights around 1
            state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[name] = 0.15 * torch.randn(shape, generator=generator)
    return ExportSource(arch, ModelHparams(rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256),
                        state, tokenizer_dir)


def read_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def test_uniform_model_is_written_as_llama_with_its_widths_and_tokenizer(tmp_path, spm_dir):
    out = export_gguf(random_source(UNIFORM, spm_dir), tmp_path / "u.gguf")
    fields = read_fields(out)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 96 and fields["llama.block_count"] == 2
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "llama"
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB  # padded to the embedding rows
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{VOCAB - 1}]"
    assert fields["tokenizer.ggml.add_bos_token"] is False  # our tokenizer adds no BOS
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert not list(tmp_path.glob(".*tmp*"))


def test_heterogeneous_model_is_written_as_deci_with_per_layer_arrays(tmp_path, spm_dir):
    out = export_gguf(random_source(HETEROGENEOUS, spm_dir), tmp_path / "h.gguf")
    fields = read_fields(out)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 2, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 4]
    assert fields["deci.feed_forward_length"] == [96, 64, 32]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 16
    assert fields["deci.rope.dimension_count"] == 16
    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(out).tensors}
    assert shapes["blk.1.attn_q.weight"] == [64, 32] and shapes["blk.1.attn_k.weight"] == [64, 16]
    assert shapes["blk.2.ffn_down.weight"] == [32, 64] and "output.weight" in shapes


def test_transformers_reads_the_uniform_gguf_back_to_the_source_weights(tmp_path, spm_dir):
    """transformers undoes llama.cpp's rotary row order itself: equal weights prove the permutation."""
    from transformers import AutoModelForCausalLM

    source = random_source(dataclasses.replace(UNIFORM, tie_embeddings=False), spm_dir)
    out = export_gguf(source, tmp_path / "u.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    loaded = model.state_dict()
    for name, tensor in source.state.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_each_dtype_stores_weights_within_its_precision(tmp_path, spm_dir, dtype):
    source = random_source(HETEROGENEOUS, spm_dir)
    out = export_gguf(source, tmp_path / f"{dtype}.gguf", dtype=dtype)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = tensors["blk.0.ffn_down.weight"]
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert down.tensor_type == (gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.Q8_0)
    stored = gguf.quants.dequantize(down.data, down.tensor_type).reshape(64, 96)
    original = source.state["model.layers.0.mlp.down_proj.weight"].numpy()
    # f16: half an ulp, 2^-11 relative. q8_0: half a step of the block's scale s = max|w|/127,
    # plus 127 steps of the scale's own f16 rounding (s * 2^-11): 0.562 s.
    step = np.repeat(np.abs(original.reshape(64, 3, 32)).max(-1, keepdims=True) / 127, 32, -1).reshape(64, 96)
    bound = np.abs(original) * 2**-11 if dtype == "f16" else step * (0.5 + 127 * 2**-11)
    assert np.all(np.abs(stored - original) <= bound * 1.001 + 1e-7)


def test_llama_cpp_tokenizes_text_like_our_sentencepiece_tokenizer(tmp_path, spm_dir):
    llamacpp = require_llamacpp()
    out = export_gguf(random_source(HETEROGENEOUS, spm_dir), tmp_path / "h.gguf")
    texts = [CODE, Path(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/decoder.py")[0]).read_text()[:3000]]
    reply = llamacpp.run_llamacpp(out, tokenize=texts)
    ours = load_tokenizer(spm_dir)
    assert reply.tokenized == [ours.tokenize(t) for t in texts]


def _byte_level_pre_tokenizer(name: str):
    """The Hugging Face pre-tokenizer that each llama.cpp name stands for, and its ignore_merges."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "gpt-2":
        return byte_level, False
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True


PRE_TOKENIZER_TEXT = "(Hello) DON'T don't 2024-12345 x1y22z333 ünïcödé  two  spaces\n\n\r\n\tindent ...!!\n"


@pytest.fixture(scope="module")
def byte_level_bpe():
    """A byte-level BPE trained by `tokenizers` under GPT-2's rules on stdlib code and numbers, so
    that its vocab holds multi-digit and long tokens the other rules split differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = _byte_level_pre_tokenizer("gpt-2")[0], decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 12, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/*.py"))
    tokenizer.train_from_iterator([Path(f).read_text() for f in files] + [PRE_TOKENIZER_TEXT] * 50, trainer)
    return tokenizer


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_llama_cpp_tokenizes_like_each_byte_level_pre_tokenizer_we_map(tmp_path, byte_level_bpe, pre):
    """One BPE vocab under each pre-tokenizer the exporter maps to a llama.cpp name (GPT-2's
    regex, SmolLM's single digits, Llama 3's split with ignore_merges): llama.cpp's ids equal
    tokenizers' own, which differ from one rule set to the next on this text."""
    import json

    from tokenizers import Tokenizer

    llamacpp = require_llamacpp()
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(pre)
    tokenizer = Tokenizer.from_str(byte_level_bpe.to_str())  # a copy: the fixture is shared
    tokenizer.pre_tokenizer = pre_tokenizer
    spec = json.loads(tokenizer.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    out = export_gguf(random_source(UNIFORM, tmp_path / "tok"), tmp_path / "m.gguf")
    assert read_fields(out)["tokenizer.ggml.pre"] == pre
    texts = [PRE_TOKENIZER_TEXT, CODE]
    reference = Tokenizer.from_str(json.dumps(spec))
    ours = [reference.encode(t, add_special_tokens=False).ids for t in texts]
    assert llamacpp.run_llamacpp(out, tokenize=texts).tokenized == ours
    if pre != "gpt-2":  # the mapping matters: GPT-2's rules would give other ids
        reference.pre_tokenizer = _byte_level_pre_tokenizer("gpt-2")[0]
        assert [reference.encode(t, add_special_tokens=False).ids for t in texts] != ours


def test_llama_cpp_loads_every_dtype_and_scores_close_to_f32(tmp_path, spm_dir):
    """llama.cpp accepts each file; the quantised ones move per-token log-probs only a little."""
    llamacpp = require_llamacpp()
    source = random_source(HETEROGENEOUS, spm_dir)
    ids = load_tokenizer(spm_dir).tokenize(CODE * 3)[:96]
    logprobs = {}
    for dtype in GGUF_DTYPES:
        out = export_gguf(source, tmp_path / f"{dtype}.gguf", dtype=dtype)
        logprobs[dtype] = np.array(llamacpp.run_llamacpp(out, score=[ids]).logprobs[0])
    perplexity = {dtype: float(np.exp(-values.mean())) for dtype, values in logprobs.items()}
    assert len(logprobs["f32"]) == len(ids) - 1 and np.all(logprobs["f32"] < 0)
    # Measured on this random model: f16 0.005%, q8_0 1.5% (llama.cpp also rounds activations to 8 bits).
    assert abs(perplexity["f16"] / perplexity["f32"] - 1) < 1e-3
    assert abs(perplexity["q8_0"] / perplexity["f32"] - 1) < 0.03


def test_llama3_rope_scaling_gives_transformers_log_probs_in_llama_cpp(tmp_path, spm_dir):
    """Llama 3 rope scaling travels as llama.cpp's `rope_freqs` divisors; a short original context
    (32) makes most frequencies scaled, so positions up to 200 would disagree without them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llamacpp = require_llamacpp()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         rope_parameters={**scaling, "rope_theta": 10000.0}, tie_word_embeddings=False,
                         initializer_range=0.06)  # logits large enough that rotary errors show
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    arch = dataclasses.replace(UNIFORM, tie_embeddings=False)
    hparams = ModelHparams(rope_theta=10000.0, rms_norm_eps=config.rms_norm_eps, max_position_embeddings=256,
                           rope_scaling=scaling)
    out = export_gguf(ExportSource(arch, hparams, dict(reference.state_dict()), spm_dir), tmp_path / "r.gguf")
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logprobs = reference(ids[None]).logits[0].log_softmax(-1)
    ours = logprobs[:-1].gather(1, ids[1:, None])[:, 0].numpy()
    theirs = np.array(llamacpp.run_llamacpp(out, score=[ids.tolist()]).logprobs[0])
    assert np.abs(theirs - ours).max() < 5e-3  # 3e-4 measured; 0.17 without the divisors


# ----- bad input: one line naming the layer/tensor/file, before anything is written ------------
def _refused(tmp_path: Path, source: ExportSource, dtype: str = "f32") -> str:
    with pytest.raises(ExportError) as caught:
        export_gguf(source, tmp_path / "out.gguf", dtype=dtype)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("layer, widths, reason", [
    (0, dict(num_attention_heads=0, num_query_groups=0), "head size and rotary size"),
    (1, dict(ffn_hidden_size=0), "drops that layer's attention output"),
    (2, dict(num_query_groups=0), "linear attention"),
])
def test_shapes_llama_cpp_deci_mishandles_are_refused_naming_the_layer(tmp_path, spm_dir, layer, widths, reason):
    arch = HETEROGENEOUS.replace_layer(layer, **widths)
    source = dataclasses.replace(random_source(HETEROGENEOUS, spm_dir), arch=arch)
    message = _refused(tmp_path, source)
    assert f"layer {layer}" in message and reason in message


def test_q8_0_refuses_a_width_that_is_not_a_multiple_of_its_block(tmp_path, spm_dir):
    arch = HETEROGENEOUS.replace_layer(1, ffn_hidden_size=40)
    message = _refused(tmp_path, random_source(arch, spm_dir), dtype="q8_0")
    assert "layer 1" in message and "ffn_hidden_size 40" in message and "--dtype f16" in message
    assert export_gguf(random_source(arch, spm_dir), tmp_path / "ok.gguf", dtype="f16").is_file()


def test_a_tensor_whose_shape_disagrees_with_the_architecture_is_named(tmp_path, spm_dir):
    source = random_source(HETEROGENEOUS, spm_dir)
    source.state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 64)
    message = _refused(tmp_path, source)
    assert "model.layers.1.mlp.up_proj.weight" in message and "[65, 64]" in message and "[64, 64]" in message


def test_a_rope_scaling_llama_cpp_cannot_express_is_named(tmp_path, spm_dir):
    source = random_source(UNIFORM, spm_dir)
    source = dataclasses.replace(source, hparams=ModelHparams(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    message = _refused(tmp_path, source)
    assert "'yarn'" in message and "llama3" in message


def test_an_unknown_dtype_lists_the_valid_ones(tmp_path, spm_dir):
    message = _refused(tmp_path, random_source(UNIFORM, spm_dir), dtype="q4_k")
    assert "q4_k" in message and "f32, f16, q8_0" in message


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, spm_dir):
    small = dataclasses.replace(UNIFORM, vocab_size=256)
    message = _refused(tmp_path, random_source(small, spm_dir))
    assert "tokenizer.model" in message and "500 tokens" in message and "256" in message


def test_a_tokenizer_llama_cpp_cannot_reproduce_is_named(tmp_path, spm_dir):
    """A sentencepiece-style BPE (byte fallback) without its tokenizer.model: llama.cpp's `llama`
    tokenizer needs the model's scores, which tokenizer.json does not hold."""
    only_json = tmp_path / "tok"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((spm_dir / "tokenizer.json").read_bytes())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    message = _refused(out_dir, random_source(UNIFORM, only_json))
    assert str(only_json / "tokenizer.json") in message and "byte_fallback=True" in message


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, spm_dir, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        export_gguf(random_source(UNIFORM, spm_dir), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert out.read_bytes() == b"previous export"


# ----- a checkpoint of our own model: random init, our sentencepiece tokenizer, per-layer widths --
OWN = HETEROGENEOUS.replace_layer(1, ffn_hidden_size=40)  # 40: not a q8_0 row length


@pytest.fixture(scope="module")
def own_checkpoint(single_rank, spm_dir, tmp_path_factory) -> Path:
    """Drawn by our model code with a wide init (std 0.1), so that rotary or layout errors move
    the log-probs visibly; saved as a weights-only checkpoint with the tokenizer."""
    from efficientllm.config import Config
    from efficientllm.model import ModelOptions, build_model_chunks

    chunks = build_model_chunks(OWN, ModelOptions(seq_length=256, init_method_std=0.1))
    return checkpoint.save_model_weights(chunks, tmp_path_factory.mktemp("own") / "ckpt", Config(), OWN,
                                         load_tokenizer(spm_dir), {"test": "random init"})


def test_llama_cpp_scores_our_own_checkpoint_like_our_model(own_checkpoint, tmp_path, capsys):
    from efficientllm import cli

    llamacpp = require_llamacpp()
    out = tmp_path / "own.gguf"
    assert cli.main(["export", "gguf", str(own_checkpoint), str(out)]) == 0
    assert "deci" in capsys.readouterr().out
    ids = checkpoint.load_tokenizer_from(own_checkpoint).tokenize(CODE * 4)[:200]
    ours = Ours(own_checkpoint).token_logprobs(ids).numpy()
    theirs = np.array(llamacpp.run_llamacpp(out, score=[ids]).logprobs[0])
    assert ours.std() > 0.3  # far from uniform: the comparison can see a wrong layout
    assert np.abs(theirs - ours).max() < 5e-3  # 5e-4 measured; 0.66 with q/k rows left unpermuted


def test_cli_refuses_q8_0_for_our_checkpoint_naming_the_layer_and_width(own_checkpoint, tmp_path, capsys):
    from efficientllm import cli

    assert cli.main(["export", "gguf", str(own_checkpoint), str(tmp_path / "own.gguf"), "--dtype", "q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efficientllm: error: layer 1: ffn_hidden_size 40") and "\n" not in err
    assert list(tmp_path.iterdir()) == []

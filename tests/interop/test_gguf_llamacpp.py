"""Our model through GGUF into the real llama.cpp (and transformers), against our own forward.

The chain is the user's: SmolLM2 (a real pretrained model) imported into one of our checkpoints;
that checkpoint pruned by our own surgery into per-layer widths and saved; each checkpoint ->
load_export_source -> export_gguf (f32). "Ours" is our megatron-core GPT model built from the
checkpoint and loaded with its weights, in this process. llama.cpp gets token ids, not text, so
only the model is compared; tokenization is compared on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from efficientllm import assets
from efficientllm.architecture import Architecture
from tests.interop.gguf_support import Ours, require_llamacpp

PROMPT = "If you do much work on computers, eventually you find that there's some task you'd like to automate."
NEW_TOKENS = 24
TOKENIZER_TEXTS = [
    "Python 3.11 (2022-10-24): 12345 + 0.5 == ünïcödé?\n\tdef f(x):  return x**2  # “quoted”\n\n",
]


@pytest.fixture(scope="module")
def llamacpp():
    return require_llamacpp()


@pytest.fixture(scope="module")
def passage() -> str:
    """Held-out English prose: the opening of the Python tutorial (Debian's python3.11-doc)."""
    try:
        root = assets.debian_package("python3.11-doc")
    except assets.AssetUnavailable as err:
        pytest.skip(f"the held-out passage (Debian python3.11-doc) cannot be had here: {err}")
    text = (root / "usr/share/doc/python3.11/html/_sources/tutorial/appetite.rst.txt").read_text()
    return text[text.index("If you do much"):][:1800]


def _prune(ckpt: Path, out: Path) -> Path:
    """Our surgery on SmolLM2 (30 layers of 9 heads in 3 KV groups and 1536 FFN channels), mild
    enough to leave a language model (held-out perplexity 18.8 -> 33): layers 9, 19 and 29
    lose a query head per KV group, layer 14 a whole KV group, the odd layers 7..25 their 128 FFN
    channels of smallest down-projection norm (the outer layers are sensitive); saved as a
    weights-only checkpoint."""
    from efficientllm.config import config_from_dict
    from efficientllm.model import build_model_chunks, model_options
    from efficientllm.pruning.megatron.surgery import prune_model
    from efficientllm.pruning.plan import Plan
    from efficientllm.training import checkpoint

    found = checkpoint.find_checkpoint(ckpt)
    meta = checkpoint.verify(found)
    config, arch = config_from_dict(meta["config"]), Architecture.from_dict(meta["architecture"])
    options = model_options(config)
    chunks = build_model_chunks(arch, options)
    checkpoint.load_model_weights(chunks, found)
    heads = {9: (2, 5, 8), 19: (2, 5, 8), 29: (2, 5, 8), 14: (6, 7, 8)}
    ffn = {}
    for i in range(7, 26, 2):
        norms = chunks[0].decoder.layers[i].mlp.linear_fc2.weight.norm(dim=0)
        ffn[i] = tuple(norms.argsort()[:128].tolist())
    plan = Plan(heads=heads, ffn=ffn)
    pruned = prune_model(chunks, plan, arch, options)
    return checkpoint.save_model_weights(pruned.chunks, out, config, plan.apply(arch), checkpoint.load_tokenizer_from(found),
                                         {"pruned_from": str(found), "plan": plan.counts()})


@pytest.fixture(scope="module")
def pruned_ckpt(smollm2_checkpoint, tmp_path_factory) -> Path:
    return _prune(smollm2_checkpoint, tmp_path_factory.mktemp("pruned") / "ckpt")


@dataclass
class Exported:
    ckpt: Path
    gguf: Path
    arch: Architecture
    state: dict[str, torch.Tensor]


def _export(ckpt: Path, out: Path) -> Exported:
    from efficientllm.interop.export_source import load_export_source
    from efficientllm.interop.gguf_export import export_gguf

    source = load_export_source(ckpt)
    return Exported(ckpt, export_gguf(source, out, dtype="f32"), source.arch, source.state)


@pytest.fixture(scope="module")
def exported(smollm2_checkpoint, pruned_ckpt, tmp_path_factory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("gguf")
    return {"smollm2": _export(smollm2_checkpoint, root / "smollm2-f32.gguf"),
            "pruned": _export(pruned_ckpt, root / "pruned-f32.gguf")}


@pytest.fixture(scope="module")
def runs(exported, llamacpp, passage):
    """Per model: our tokenizer's ids, our model's numbers and llama.cpp's (one node run each)."""
    from efficientllm.training.checkpoint import load_tokenizer_from

    results = {}
    for name, model in exported.items():
        tokenizer = load_tokenizer_from(model.ckpt)
        prompt, passage_ids = tokenizer.tokenize(PROMPT), tokenizer.tokenize(passage)
        ours = Ours(model.ckpt)
        theirs = llamacpp.run_llamacpp(model.gguf, tokenize=[passage, *TOKENIZER_TEXTS],
                                       greedy=[(prompt, NEW_TOKENS)], score=[passage_ids], context_size=1024)
        results[name] = {
            "tokenized": [tokenizer.tokenize(t) for t in [passage, *TOKENIZER_TEXTS]],
            "ours_greedy": ours.greedy(prompt, NEW_TOKENS),
            "ours_ppl": ours.perplexity(passage_ids),
            "ours_logits": ours.logits(prompt),
            "prompt": prompt,
            "llamacpp": theirs,
        }
    return results


def test_pruned_model_is_exported_as_deci_with_its_per_layer_widths(exported):
    import gguf

    fields = {k: f.contents() for k, f in gguf.GGUFReader(exported["pruned"].gguf).fields.items()}
    arch = exported["pruned"].arch
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [l.num_attention_heads for l in arch.layers]
    assert fields["deci.attention.head_count_kv"] == [l.num_query_groups for l in arch.layers]
    assert fields["deci.feed_forward_length"] == [l.ffn_hidden_size for l in arch.layers]
    assert {6, 9} <= set(fields["deci.attention.head_count"]) and {2, 3} <= set(fields["deci.attention.head_count_kv"])


def test_transformers_reads_the_smollm2_gguf_back_with_our_weights_and_logits(exported, runs):
    """transformers' GGUF reader undoes llama.cpp's rotary row order itself; the weights come back
    bit-exact and its fp32 logits equal our model's (max |diff| <= 1e-4)."""
    from transformers import AutoModelForCausalLM

    model = exported["smollm2"]
    hf = AutoModelForCausalLM.from_pretrained(model.gguf.parent, gguf_file=model.gguf.name, dtype=torch.float32,
                                              attn_implementation="eager")
    loaded = hf.state_dict()
    for name, tensor in model.state.items():
        assert torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        logits = hf(torch.tensor([runs["smollm2"]["prompt"]])).logits[0]
    assert (logits - runs["smollm2"]["ours_logits"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["smollm2", "pruned"])
def test_llama_cpp_greedy_continuation_equals_ours(runs, name):
    run = runs[name]
    assert len(run["llamacpp"].continuations[0]) == NEW_TOKENS
    assert run["llamacpp"].continuations[0] == run["ours_greedy"]


@pytest.mark.parametrize("name", ["smollm2", "pruned"])
def test_llama_cpp_perplexity_equals_ours_within_half_a_percent(runs, name):
    run = runs[name]
    theirs, ours = run["llamacpp"].perplexity(), run["ours_ppl"]
    assert len(run["llamacpp"].logprobs[0]) >= 300  # the whole passage, scored in one context
    assert abs(theirs / ours - 1) < 0.005, (theirs, ours)


def test_llama_cpp_tokenizes_text_like_our_tokenizer(runs):
    run = runs["smollm2"]
    assert run["llamacpp"].tokenized == run["tokenized"]


def test_cli_exports_a_checkpoint_as_q8_0_that_llama_cpp_scores_close_to_ours(pruned_ckpt, runs, llamacpp, passage,
                                                                               tmp_path, capsys):
    from efficientllm import cli
    from efficientllm.training.checkpoint import load_tokenizer_from

    out = tmp_path / "pruned-q8_0.gguf"
    assert cli.main(["export", "gguf", str(pruned_ckpt), str(out), "--dtype", "q8_0"]) == 0
    assert "deci" in capsys.readouterr().out
    ids = load_tokenizer_from(pruned_ckpt).tokenize(passage)
    quantised = llamacpp.run_llamacpp(out, score=[ids], context_size=1024).perplexity()
    assert abs(quantised / runs["pruned"]["ours_ppl"] - 1) < 0.02


def test_cli_refuses_an_unknown_dtype_in_one_line_before_writing(smollm2_checkpoint, tmp_path, capsys):
    from efficientllm import cli

    assert cli.main(["export", "gguf", str(smollm2_checkpoint), str(tmp_path / "x.gguf"), "--dtype", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efficientllm: error: --dtype 'q4_k'") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_inference_bench_times_the_same_greedy_decode_in_every_backend(pruned_ckpt, exported, runs, llamacpp,
                                                                         tmp_path):
    """bench/inference's backends do the work they are timed for on a model with per-layer widths:
    each decode continues the prompt with our own greedy tokens (megatron-core's static KV cache,
    transformers' cache on the HF export, llama.cpp on the GGUF), every repeat is timed."""
    from bench.inference.speed import Workload, llamacpp_timings, megatron_timings, transformers_timings
    from efficientllm.interop.hf_export import export_hf

    prompt = runs["pruned"]["prompt"]
    work = Workload(prompt, 8, [prompt[:12], prompt[-12:]], repeats=2)
    hf = export_hf(pruned_ckpt, tmp_path / "hf")
    for backend in (megatron_timings([pruned_ckpt], work), transformers_timings([hf], work),
                    llamacpp_timings([exported["pruned"].gguf], work, threads=1)):
        [timing] = backend
        assert timing.continuation == runs["pruned"]["ours_greedy"][:8]
        assert len(timing.decode_s) == len(timing.prefill_s) == 2 and min(timing.decode_s + timing.prefill_s) > 0

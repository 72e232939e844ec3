"""Hugging Face tokenizers beside sentencepiece: the same interface, the ids transformers gives,
our sentencepiece models exported as HF fast tokenizers with identical ids, and both kinds used
by preprocessing and stored in checkpoints."""

from __future__ import annotations

import glob
import random
import sysconfig

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from efficientllm import assets, cli
from efficientllm.data import DataError
from efficientllm.data.datasets import check_vocab
from efficientllm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer


def _real_texts(count: int = 24) -> list[str]:
    """Real code and prose: stdlib modules and (when it can be had) Python documentation."""
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/*.py"))
    random.Random(0).shuffle(files)
    texts = [open(f, encoding="utf-8").read() for f in files[:count]]
    try:
        docs = sorted(glob.glob(f"{assets.debian_package('python3.11-doc')}/**/*.rst.txt", recursive=True))
        texts += [open(f, encoding="utf-8").read() for f in random.Random(1).sample(docs, count)]
    except assets.AssetUnavailable:
        pass
    return texts + ["a </s> b <s> <unk> <pad> <|endoftext|> <|im_start|>", "  \t\n\n  ünï 😀 12345\u00a0"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _real_texts()


def test_an_hf_directory_loads_as_the_hf_tokenizer_with_transformers_ids(smollm2_hf_dir, texts):
    from transformers import AutoTokenizer

    ours = load_tokenizer(smollm2_hf_dir)
    theirs = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    assert isinstance(ours, HFTokenizer)
    assert ours.tokenize_batch(texts) == [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert ours.detokenize(ours.tokenize(texts[0])) == texts[0]
    assert ours.vocab_size == len(theirs) and ours.eod == theirs.eos_token_id
    # what lm-eval's HFLM conditions a context-free continuation on: BOS when there is one
    assert ours.prefix_id == theirs.bos_token_id != ours.eod


def test_our_sentencepiece_saved_for_hf_gives_identical_ids_and_no_automatic_bos(code_tokenizer_dir, texts):
    from transformers import AutoTokenizer

    ours = load_tokenizer(code_tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(code_tokenizer_dir))
    assert isinstance(ours, SentencePieceTokenizer)  # the directory's own .model, not the conversion
    for text in texts:
        ids = ours.tokenize(text)
        assert hf(text)["input_ids"] == ids  # add_special_tokens left at its default: nothing added
        assert hf.decode(ids) == ours.detokenize(ids)
    # our evaluation conditions on EOD; lm-eval conditions on BOS: they are the same token
    assert hf.bos_token_id == ours.prefix_id == ours.eod == hf.eos_token_id


def test_a_checkpoint_stores_its_tokenizer_and_loads_it_back(smollm2_checkpoint, smollm2_hf_dir):
    from efficientllm.training import checkpoint

    stored = checkpoint.checkpoint_tokenizer(smollm2_checkpoint)
    assert stored.is_relative_to(smollm2_checkpoint) and (stored / "tokenizer.json").is_file()
    source, loaded = load_tokenizer(smollm2_hf_dir), checkpoint.load_tokenizer_from(smollm2_checkpoint)
    assert loaded.tokenize("import this\n") == source.tokenize("import this\n")
    assert (loaded.eod, loaded.prefix_id, loaded.vocab_size) == (source.eod, source.prefix_id, source.vocab_size)


def test_preprocess_cli_takes_an_hf_directory_and_ends_documents_with_its_eod(smollm2_hf_dir, tmp_path):
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/*.py"))[:3]
    assert cli.main(["preprocess", "--input", *files, "--tokenizer", str(smollm2_hf_dir),
                     "--output-prefix", str(tmp_path / "data")]) == 0
    tokenizer = load_tokenizer(smollm2_hf_dir)
    dataset = IndexedDataset(str(tmp_path / "data"))
    for index, path in enumerate(files):
        expected = tokenizer.tokenize(open(path, encoding="utf-8").read()) + [tokenizer.eod]
        assert np.array_equal(dataset[index], expected)


def test_the_old_tokenizer_model_flag_still_works(code_tokenizer_dir, tmp_path):
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/*.py"))[:1]
    assert cli.main(["preprocess", "--input", *files, "--tokenizer-model", str(code_tokenizer_dir / "tokenizer.model"),
                     "--output-prefix", str(tmp_path / "data")]) == 0
    dataset = IndexedDataset(str(tmp_path / "data"))  # kept: its documents are views of its mmap
    assert dataset[0][-1] == load_tokenizer(code_tokenizer_dir).eod


def test_an_hf_tokenizer_larger_than_the_model_vocab_is_refused(smollm2_hf_dir):
    with pytest.raises(DataError, match="49152 tokens but the model's vocab_size is 32000"):
        check_vocab(load_tokenizer(smollm2_hf_dir).vocab_size, 32000)


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} holds no tokenizer"):
        load_tokenizer(tmp_path)

"""The data pipeline: stdlib corpus -> tokenizer -> .bin/.idx -> megatron GPT datasets.

Real files, a real tokenizer trained on real stdlib sources, megatron-core's own readers.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from efficientllm.data import DataError
from efficientllm.data.corpus import corpus_record, stdlib_corpus
from efficientllm.data.datasets import build_gpt_datasets, check_vocab
from efficientllm.data.preprocess import preprocess_files
from efficientllm.data.tokenizer import load_tokenizer, train_tokenizer

SEQ = 32
VOCAB = 1024


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(max_bytes=600_000)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_tokenizer(corpus.train, tmp_path_factory.mktemp("tok") / "code.model", VOCAB)


@pytest.fixture(scope="module")
def prefixes(corpus, tokenizer, tmp_path_factory):
    """Indexed datasets of the train and held-out files: {"train": prefix, "heldout": prefix}."""
    out = tmp_path_factory.mktemp("indexed")
    for part in ("train", "heldout"):
        preprocess_files(getattr(corpus, part), tokenizer, out / part)
    return {part: str(out / part) for part in ("train", "heldout")}


def build(tokenizer, cache, data_path, **overrides):
    args = dict(seq_length=SEQ, seed=7, train_samples=400, valid_samples=16, split="90,10,0")
    args.update(overrides)
    return build_gpt_datasets(tokenizer, data_path=data_path, data_cache_path=cache, **args)


def documents_of(prefix: str) -> list[bytes]:
    return [np.asarray(doc, np.int64).tobytes() for doc in IndexedDataset(prefix)]


def pieces(window: np.ndarray, eod: int) -> list[bytes]:
    """A sample cut after each EOD: each piece must lie inside one document."""
    cuts = np.flatnonzero(window == eod) + 1
    return [p.astype(np.int64).tobytes() for p in np.split(window, cuts) if len(p)]


def copy_prefix(prefix: str, to: Path) -> str:
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, str(to) + suffix)
    return str(to)


# corpus


def test_corpus_split_is_deterministic():
    assert stdlib_corpus(max_bytes=600_000) == stdlib_corpus(max_bytes=600_000)


def test_corpus_split_is_by_file_and_disjoint():
    full = stdlib_corpus()
    assert not set(full.train) & set(full.heldout)
    assert 0.02 < len(full.heldout) / (len(full.train) + len(full.heldout)) < 0.10
    for f in full.train:
        assert f.suffix == ".py" and "test" not in f.relative_to(full.root).parts


def test_capped_corpus_fits_max_bytes_and_never_trains_on_heldout_files(corpus):
    full = stdlib_corpus()
    assert sum(f.stat().st_size for f in corpus.train + corpus.heldout) <= 600_000
    assert set(corpus.heldout) <= set(full.heldout)
    assert set(corpus.train) <= set(full.train)


def test_corpus_record_counts_files_and_bytes(corpus):
    record = corpus_record(corpus)
    assert record["train"]["files"] == len(corpus.train)
    assert record["heldout"]["bytes"] == sum(f.stat().st_size for f in corpus.heldout)


# tokenizer


def test_tokenizer_round_trips_code_with_indentation_and_newlines(tokenizer, corpus):
    snippets = [
        corpus.heldout[0].read_text(),
        inspect.getsource(textwrap.dedent),
        inspect.getsource(json.JSONEncoder.iterencode),
        "def f(x):\n\tif x:  \n\n\t\treturn 'caf\u00e9 \u2713'\r\n    \n",
    ]
    for text in snippets:
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_newline_is_one_token_and_indentation_is_kept(tokenizer):
    assert len(tokenizer.tokenize("\n")) == 1
    assert tokenizer.detokenize(tokenizer.tokenize("        pass")) == "        pass"


def test_tokenizer_training_is_deterministic(corpus, tmp_path):
    first = train_tokenizer(corpus.train[:20], tmp_path / "a.model", 512)
    second = train_tokenizer(corpus.train[:20], tmp_path / "b.model", 512)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert first.unique_identifiers == second.unique_identifiers


def test_tokenizer_has_distinct_eod_and_pad_inside_the_vocab(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert 0 <= tokenizer.eod < VOCAB and 0 <= tokenizer.pad < VOCAB
    assert tokenizer.eod != tokenizer.pad


def test_loading_a_missing_or_invalid_tokenizer_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model"):
        load_tokenizer(tmp_path / "bad.model")


# preprocess


def test_preprocess_writes_one_document_per_file_that_megatron_reads(corpus, tokenizer, prefixes):
    dataset = IndexedDataset(prefixes["heldout"])
    texts = [f.read_text() for f in corpus.heldout if f.stat().st_size]
    assert len(dataset) == len(texts)
    for doc, text in zip(dataset, texts):
        assert doc.tolist() == tokenizer.tokenize(text) + [tokenizer.eod]
    assert dataset.index.dtype == np.uint16


def test_preprocess_record_counts_documents_tokens_and_bytes(corpus, tokenizer, tmp_path):
    files = corpus.heldout[:3]
    record = preprocess_files(files, tokenizer, tmp_path / "p")
    texts = [f.read_text() for f in files if f.stat().st_size]
    assert record["documents"] == len(texts)
    assert record["tokens"] == sum(len(tokenizer.tokenize(t)) + 1 for t in texts)
    assert record["bytes"] == sum(len(t.encode()) for t in texts)


def test_preprocess_reads_one_document_per_jsonl_line_from_the_named_field(tokenizer, tmp_path):
    lines = [{"content": "import os\n"}, {"content": "x = 1\n    y = 2\n"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    preprocess_files([path], tokenizer, tmp_path / "j", json_key="content")
    dataset = IndexedDataset(str(tmp_path / "j"))
    assert [tokenizer.detokenize(doc[:-1]) for doc in dataset] == [l["content"] for l in lines]


def test_preprocess_names_the_line_missing_the_json_field_and_leaves_no_files(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a = 1"}\n{"body": "b = 2"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: no string field 'text'"):
        preprocess_files([path], tokenizer, tmp_path / "out" / "j")
    assert os.listdir(tmp_path / "out") == []


def test_preprocess_names_an_invalid_json_line(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a = 1"}\nnot json\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: invalid JSON"):
        preprocess_files([path], tokenizer, tmp_path / "j")


def test_preprocess_names_a_missing_input(tokenizer, tmp_path):
    with pytest.raises(DataError, match="absent.txt"):
        preprocess_files([tmp_path / "absent.txt"], tokenizer, tmp_path / "j")


# GPT datasets


def test_samples_are_seq_length_plus_one_tokens_from_the_file(tokenizer, prefixes, tmp_path):
    train, valid = build(tokenizer, tmp_path, [prefixes["train"]])
    documents = documents_of(prefixes["train"])
    assert len(train) >= 400 and len(valid) >= 16
    for i in (0, 1, len(train) - 1):
        sample = train[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert sample["tokens"].shape == (SEQ,)
        assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
        window = np.concatenate([sample["tokens"], sample["labels"][-1:]])
        for piece in pieces(window, tokenizer.eod):
            assert any(piece in doc for doc in documents)


def test_train_and_valid_samples_come_from_disjoint_documents(tokenizer, prefixes, tmp_path):
    train, valid = build(tokenizer, tmp_path, [prefixes["train"]])
    assert not set(train.document_index.tolist()) & set(valid.document_index.tolist())


def test_blend_draws_from_both_prefixes_in_weight_proportion(tokenizer, prefixes, tmp_path):
    blend = ["0.7", prefixes["train"], "0.3", prefixes["heldout"]]
    train, _ = build(tokenizer, tmp_path, blend, train_samples=1000)
    drawn = np.array([train[i]["dataset_id"] for i in range(len(train))])
    assert len(drawn) == 1000
    assert abs(np.mean(drawn == 0) - 0.7) < 0.02


def test_rebuilt_dataset_resumes_at_the_same_sample(tokenizer, prefixes, tmp_path):
    blend = ["0.5", prefixes["train"], "0.5", prefixes["heldout"]]
    first, _ = build(tokenizer, tmp_path, blend)
    cache = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    resumed, _ = build(tokenizer, tmp_path, blend)  # a new run: loads megatron's index cache
    assert {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()} == cache
    for i in range(100, 110):
        assert resumed[i]["tokens"].tolist() == first[i]["tokens"].tolist()


def test_valid_data_path_supplies_the_validation_samples(tokenizer, prefixes, tmp_path):
    train, valid = build(
        tokenizer, tmp_path, [prefixes["train"]], valid_data_path=[prefixes["heldout"]]
    )
    heldout = documents_of(prefixes["heldout"])
    for piece in pieces(valid[0]["tokens"].numpy(), tokenizer.eod):
        assert any(piece in doc for doc in heldout)
    assert len(train) >= 400


def test_no_validation_dataset_without_validation_samples(tokenizer, prefixes, tmp_path):
    _, valid = build(tokenizer, tmp_path, [prefixes["train"]], valid_samples=0)
    assert valid is None


# bad input stops before any work, naming the file or field


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_a_prefix_missing_a_file_is_named(tokenizer, prefixes, tmp_path, missing):
    prefix = copy_prefix(prefixes["heldout"], tmp_path / "data")
    os.remove(prefix + missing)
    with pytest.raises(DataError, match=f"data{missing} not found"):
        build(tokenizer, tmp_path, [prefix])


def test_a_truncated_bin_is_named(tokenizer, prefixes, tmp_path):
    prefix = copy_prefix(prefixes["heldout"], tmp_path / "data")
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(DataError, match=r"data\.bin is truncated"):
        build(tokenizer, tmp_path, [prefix])


@pytest.mark.parametrize("damage", ["magic", "short"])
def test_a_corrupt_idx_is_named(tokenizer, prefixes, tmp_path, damage):
    prefix = copy_prefix(prefixes["heldout"], tmp_path / "data")
    raw = Path(prefix + ".idx").read_bytes()
    Path(prefix + ".idx").write_bytes(b"GARBAGE!!" + raw[9:] if damage == "magic" else raw[:60])
    with pytest.raises(DataError, match=r"data\.idx is not a valid megatron index"):
        build(tokenizer, tmp_path, [prefix])


@pytest.mark.parametrize("weight", ["0", "-0.3", "nan", "heavy"])
def test_a_blend_weight_that_is_not_positive_is_named(tokenizer, prefixes, tmp_path, weight):
    blend = ["0.7", prefixes["train"], weight, prefixes["heldout"]]
    with pytest.raises(DataError, match=f"weight '{weight}' of .*heldout is not a positive"):
        build(tokenizer, tmp_path, blend)


def test_a_blend_with_a_dangling_weight_is_rejected(tokenizer, prefixes, tmp_path):
    with pytest.raises(DataError, match="odd length"):
        build(tokenizer, tmp_path, ["0.7", prefixes["train"], "0.3"])


@pytest.mark.parametrize("split", ["", "90,-10", "1,2,3,4", "ninety"])
def test_an_invalid_split_is_named(tokenizer, prefixes, tmp_path, split):
    with pytest.raises(DataError, match="split .* is not valid"):
        build(tokenizer, tmp_path, [prefixes["train"]], split=split)


def test_a_split_that_leaves_validation_without_documents_is_named(tokenizer, prefixes, tmp_path):
    with pytest.raises(DataError, match="gives the valid part no documents of .*heldout"):
        build(tokenizer, tmp_path, [prefixes["heldout"]], split="999,1,0")


def test_a_tokenizer_larger_than_the_model_vocab_is_rejected():
    check_vocab(1024, 1024)
    with pytest.raises(DataError, match=r"code\.model has 1024 tokens .* vocab_size is 512"):
        check_vocab(1024, 512, source="tokenizer code.model")


def test_english_docs_corpus_is_prose_split_by_file_without_translations():
    from efficientllm import assets
    from efficientllm.data.corpus import english_docs_corpus

    try:
        split = english_docs_corpus(heldout_fraction=0.05, max_bytes=2_000_000)
    except assets.AssetUnavailable as err:
        pytest.skip(str(err))
    assert split.source == "english-docs"
    assert not set(split.train) & set(split.heldout)
    files = split.train + split.heldout
    assert all(f.name.endswith(".rst.txt") and "translations" not in f.parts for f in files)
    assert {"python3.11-doc", "linux-doc-6.1"} <= {f.relative_to(split.root).parts[0] for f in files}
    assert sum(f.stat().st_size for f in files) <= 2_000_000
    text = "".join(f.read_text(encoding="utf-8") for f in split.heldout)
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text)  # prose, not code

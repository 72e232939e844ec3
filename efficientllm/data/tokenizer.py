"""Tokenizers: our sentencepiece BPE for source code, and any Hugging Face tokenizer (tokenizer.json).

Both are megatron-core dataset tokenizers with one interface: `tokenize(text)` (no special tokens
added), `tokenize_batch`, `detokenize`, `vocab_size`, `eod` (written after every training
document), `pad`, `prefix_id` (the token that conditions a document's first token in evaluation)
and `save(directory)`, which writes files that both `load_tokenizer` and
`transformers.AutoTokenizer` read, so a checkpoint or an export carries its own tokenizer.

Our sentencepiece model is trained for code: indentation and newlines are syntax and every byte
must survive the round trip, so it runs with identity normalisation, no whitespace collapsing, no
dummy prefix, byte fallback (no `<unk>`), and newline as its own piece.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

from efficientllm.atomic import write_atomically
from efficientllm.data import DataError

# sentencepiece's fixed ids are unk=0, bos=1, eos=2; give pad its own id so megatron's dataset
# does not find it colliding with EOD (it would then silently stop masking pad).
PAD_ID = 3
# megatron-core's "no pad token" id (datasets/megatron_dataset.py): never a token of the data.
NO_PAD = -1
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Written by `save` beside a sentencepiece model, so loading the directory again gives the
# sentencepiece model itself rather than its Hugging Face conversion.
MARKER_FILE = "efficientllm_tokenizer.json"
MARKER_FORMAT = "efficientllm-tokenizer/1"
_CHUNK_CHARS = 2000  # training "sentences" are runs of whole lines up to about this size

_TRAINER_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,  # a run of indentation becomes one piece
    "user_defined_symbols": ["\n"],  # sentences span lines, so newline needs a piece of its own
    "split_digits": True,
    "pad_id": PAD_ID,
    "max_sentence_length": 4 * _CHUNK_CHARS,
    "shuffle_input_sentence": True,
    "minloglevel": 2,
}


class Tokenizer(MegatronTokenizerBase):
    """What datasets, preprocessing, evaluation and export read from a tokenizer.

    megatron's GPTDataset uses `eod` (document ends), `pad` (padding), `vocab_size` (token dtype)
    and `unique_identifiers` (part of its index-cache key: a hash of the tokenizer's files, so a
    changed tokenizer never reuses stale indices).
    """

    def __init__(self, path: str, files_sha256: str) -> None:
        super().__init__(path, {})
        self._unique_identifiers = {"class": type(self).__name__, "files_sha256": files_sha256}

    @property
    def unique_identifiers(self) -> dict[str, str]:
        return dict(self._unique_identifiers)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    @property
    def pad(self) -> int:
        raise NotImplementedError

    @property
    def prefix_id(self) -> int:
        raise NotImplementedError

    @property
    def vocab(self) -> dict[str, int]:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def detokenize(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer's files into `directory` (created); returns it."""
        raise NotImplementedError

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("pretraining tokenizers are used without a chat template")


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: str) -> None:
        super().__init__(model_path, hashlib.sha256(processor.serialized_model_proto()).hexdigest())
        self._sp = processor

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def prefix_id(self) -> int:
        # Our pretraining puts EOD between documents and never saw a BOS.
        return self.eod

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts in one call: far faster than one call per text for short documents."""
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike) -> Path:
        """The .model itself, plus its Hugging Face fast-tokenizer conversion (same ids), whose
        BOS is our EOD and which adds no special tokens to a text: lm-eval then conditions a
        document on the token our evaluation uses."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / SPM_FILE).write_bytes(self._sp.serialized_model_proto())
        self.to_hf().save_pretrained(str(root))
        (root / MARKER_FILE).write_text(json.dumps({"format": MARKER_FORMAT, "kind": "sentencepiece", "model": SPM_FILE}))
        return root

    def to_hf(self) -> Any:
        """This model as a `transformers` fast tokenizer, converted by transformers' own
        sentencepiece converter (which follows the model's normaliser and piece settings)."""
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
        piece = self._sp.id_to_piece
        return PreTrainedTokenizerFast(
            tokenizer_object=SpmConverter.build_tokenizer_from_spm_proto(proto, vocab),
            bos_token=piece(self.eod),
            eos_token=piece(self.eod),
            unk_token=piece(self._sp.unk_id()),
            pad_token=piece(self.pad) if self.pad >= 0 else None,
            # sentencepiece reads "</s>" in a text as characters; so must the conversion
            split_special_tokens=True,
            clean_up_tokenization_spaces=False,  # code: decode must give back every space
        )


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory (tokenizer.json), read by `transformers.AutoTokenizer`,
    so ids are exactly what transformers and lm-eval compute."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as err:  # transformers raises many kinds; the cause fits on one line
            raise DataError(f"tokenizer directory {directory} cannot be read by transformers: {err}".splitlines()[0]) from None
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {directory} has no eos_token, needed as end-of-document")
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.startswith(("tokenizer", "special_tokens")))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
        super().__init__(str(directory), digest)
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def pad(self) -> int:
        pad = self._tok.pad_token_id
        return NO_PAD if pad is None or pad == self.eod else pad

    @property
    def prefix_id(self) -> int:
        # What lm-eval's HFLM conditions a context-free continuation on.
        bos = self._tok.bos_token_id
        return self.eod if bos is None else bos

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike) -> Path:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self._tok.save_pretrained(str(root))
        return root


def _load_sentencepiece(path: Path) -> SentencePieceTokenizer:
    processor = spm.SentencePieceProcessor()
    try:
        processor.load_from_serialized_proto(path.read_bytes())
    except RuntimeError:
        raise DataError(f"tokenizer model {path} is not a sentencepiece .model file") from None
    if processor.eos_id() < 0:
        raise DataError(f"tokenizer model {path} has no EOS piece, needed as end-of-document")
    return SentencePieceTokenizer(processor, str(path))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A sentencepiece `.model`, a Hugging Face tokenizer directory or a directory `save` wrote
    (a checkpoint's stored tokenizer: `checkpoint.load_tokenizer_from`)."""
    path = Path(path)
    if path.is_file():
        return _load_sentencepiece(path)
    if not path.is_dir():
        raise DataError(f"tokenizer {path} not found; give a sentencepiece .model file, a Hugging Face "
                        f"tokenizer directory (tokenizer.json) or a checkpoint")
    marker = path / MARKER_FILE
    if marker.is_file():
        return _load_sentencepiece(path / json.loads(marker.read_text())["model"])
    if (path / HF_FILE).is_file() or (path / "tokenizer_config.json").is_file():
        return HFTokenizer(path)
    if (path / SPM_FILE).is_file():
        return _load_sentencepiece(path / SPM_FILE)
    raise DataError(f"directory {path} holds no tokenizer: expected {HF_FILE}, {SPM_FILE} or a checkpoint")


def _line_chunks(files: Sequence[Path]) -> Iterator[str]:
    """Runs of whole lines, so the trainer sees newlines and indentation in context."""
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            chunk.append(line)
            size += len(line)
            if size >= _CHUNK_CHARS:
                yield "".join(chunk)
                chunk, size = [], 0
        if chunk:
            yield "".join(chunk)


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    model_path: str | os.PathLike,
    vocab_size: int = 4096,
    max_sentences: int = 20_000,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a BPE model on `files` and write it to `model_path` (atomically).

    `max_sentences` caps the chunks sentencepiece samples (reservoir sampling with `seed`), which
    bounds training time: under 1 s on the 4 MB default corpus, about 2 s on the whole stdlib
    (10 MB), for 4096 to 32000 pieces on one core. The result is byte-identical for the same
    files, options and seed.
    """
    paths = [Path(f) for f in files]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise DataError(f"tokenizer training input {missing[0] if missing else '[]'} not found")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_line_chunks(paths),
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=max_sentences,
            num_threads=os.cpu_count() or 1,
            **_TRAINER_OPTIONS,
        )
    except RuntimeError as err:
        reason = str(err).split("] ", 1)[-1]
        raise DataError(
            f"cannot train a {vocab_size}-piece tokenizer on {len(paths)} files: {reason}"
        ) from None
    return _load_sentencepiece(write_atomically(model_path, model.getvalue()))

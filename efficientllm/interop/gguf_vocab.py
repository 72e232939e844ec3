"""A model's tokenizer as the `tokenizer.ggml.*` keys of a GGUF file, so that llama.cpp
tokenizes text exactly as we do.

Two kinds are written (FORMATS.md):
- a sentencepiece `tokenizer.model` -> llama.cpp's `llama` tokenizer: pieces, scores and piece
  types straight from the model proto (its type numbers are GGUF's token types), and the
  normaliser's dummy-prefix setting;
- a Hugging Face byte-level BPE `tokenizer.json` -> `gpt2`: the vocabulary, merges, and a
  pre-tokenizer name llama.cpp knows for the same split rules (refused when there is none, since
  llama.cpp would then split text differently from us).
Special ids, merges, add-BOS/EOS and the chat template come from gguf's own `SpecialVocab`.
The token list is padded to the model's vocab size (our embeddings are padded for TP) with unused
placeholder tokens, as llama.cpp requires one token per embedding row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from efficientllm.interop.errors import ExportError

# Hugging Face pre-tokenizers (tokenizer.json) and the llama.cpp pre-tokenizer that splits text
# the same way (llama.cpp's `tokenizer.ggml.pre` names), with the BPE model's `ignore_merges`
# that llama.cpp implies for it (a word found whole in the vocab is one token, unmerged).
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, tuple[list[dict[str, Any]], bool]] = {
    "gpt-2": ([_BYTE_LEVEL], False),  # GPT-2's regex
    "smollm": ([{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL], False),  # SmolLM/StarCoder
    "llama-bpe": ([{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}}, {"type": "ByteLevel", "use_regex": False}], True),
}


@dataclass
class GGUFVocab:
    model: str  # "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    pre: str | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(tokenizer_dir: str | Path, model_vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer of `tokenizer_dir`; raises ExportError, naming the file, when it is not
    a kind llama.cpp can reproduce or holds more tokens than the model has embeddings."""
    root = Path(tokenizer_dir)
    if (root / "tokenizer.model").is_file():
        vocab = _sentencepiece(root, model_vocab_size)
    elif (root / "tokenizer.json").is_file():
        vocab = _byte_level_bpe(root, model_vocab_size)
    else:
        raise ExportError(
            f"tokenizer directory {root} has neither tokenizer.model (sentencepiece) nor "
            f"tokenizer.json (byte-level BPE); GGUF needs the tokenizer inside the file"
        )
    _pad(vocab, model_vocab_size)
    return vocab


def _check_size(path: Path, size: int, model_vocab_size: int) -> None:
    if size > model_vocab_size:
        raise ExportError(
            f"tokenizer {path} has {size} tokens but the model only {model_vocab_size} embeddings"
        )


def _pad(vocab: GGUFVocab, model_vocab_size: int) -> None:
    for index in range(len(vocab.tokens), model_vocab_size):
        vocab.tokens.append(f"[PAD{index}]")
        vocab.types.append(gguf.TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


def _special(root: Path, model_vocab_size: int, merges: bool) -> gguf.SpecialVocab:
    return gguf.SpecialVocab(root, load_merges=merges, n_vocab=model_vocab_size)


def _sentencepiece(root: Path, model_vocab_size: int) -> GGUFVocab:
    from sentencepiece import sentencepiece_model_pb2

    path = root / "tokenizer.model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf raises its own DecodeError
        raise ExportError(f"tokenizer {path} is not a sentencepiece model") from None
    if not proto.pieces:
        raise ExportError(f"tokenizer {path} is not a sentencepiece model (no pieces)")
    _check_size(path, len(proto.pieces), model_vocab_size)
    special = _special(root, model_vocab_size, merges=False)
    spec = proto.trainer_spec
    for kind, token_id in (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id), ("pad", spec.pad_id)):
        if token_id >= 0:
            special.special_token_ids.setdefault(kind, token_id)
    # llama.cpp adds BOS to sentencepiece text unless told otherwise; our tokenizer adds nothing
    # unless its Hugging Face config says so.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    return GGUFVocab(
        model="llama",
        tokens=[p.piece for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],  # sentencepiece's piece types are GGUF's numbering
        scores=[float(p.score) for p in proto.pieces],
        special=special,
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
        remove_extra_whitespaces=proto.normalizer_spec.remove_extra_whitespaces,
    )


def _byte_level_bpe(root: Path, model_vocab_size: int) -> GGUFVocab:
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # json and tokenizers raise their own errors
        raise ExportError(f"tokenizer {path} cannot be read: {err}".splitlines()[0]) from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"tokenizer {path} is a {model.get('type')} tokenizer (byte_fallback="
            f"{model.get('byte_fallback')}); GGUF export supports byte-level BPE tokenizer.json "
            f"files and sentencepiece tokenizer.model files"
        )
    pre = _llama_cpp_pre_tokenizer(path, spec.get("pre_tokenizer"), bool(model.get("ignore_merges")))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    _check_size(path, size, model_vocab_size)
    by_id = {token_id: text for text, token_id in tokenizer.get_vocab(with_added_tokens=True).items()}
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise ExportError(f"tokenizer {path} has no token with id {missing[0]} (ids must be 0..{size - 1})")
    types = [int(gguf.TokenType.NORMAL)] * size
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        types[token_id] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    special = _special(root, model_vocab_size, merges=True)
    _probe_added_specials(tokenizer, special)
    return GGUFVocab(
        model="gpt2",
        tokens=[by_id[i] for i in range(size)],
        types=types,
        scores=None,  # llama.cpp's BPE ranks merges, not tokens
        special=special,
        pre=pre,
    )


def _probe_added_specials(tokenizer: Any, special: gguf.SpecialVocab) -> None:
    """Whether our tokenizer adds BOS/EOS to a text, read off an encoding when the config is silent."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token.setdefault("bos", len(full) > len(plain) and full[0] == bos)
    special.add_special_token.setdefault("eos", len(full) > len(plain) and full[-1] == eos)


def _llama_cpp_pre_tokenizer(path: Path, pre_tokenizer: dict[str, Any] | None, ignore_merges: bool) -> str:
    steps = _steps(pre_tokenizer)
    for name, (pattern, implied_ignore_merges) in _PRE_TOKENIZERS.items():
        if len(steps) == len(pattern) and all(_matches(step, want) for step, want in zip(steps, pattern)):
            if ignore_merges != implied_ignore_merges:
                raise ExportError(
                    f"tokenizer {path}: llama.cpp's {name!r} pre-tokenizer implies ignore_merges="
                    f"{implied_ignore_merges}, but this BPE model has {ignore_merges}; llama.cpp would "
                    f"tokenize some words differently"
                )
            return name
    raise ExportError(
        f"tokenizer {path}: its pre-tokenizer {json.dumps(pre_tokenizer)[:200]} has no llama.cpp "
        f"equivalent this exporter knows (supported: GPT-2 byte-level, SmolLM digits + byte-level, "
        f"Llama-3 split + byte-level), so llama.cpp would split text differently"
    )


def _steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers") or [])
    return [pre_tokenizer]


def _matches(step: dict[str, Any], want: dict[str, Any]) -> bool:
    # tokenizer.json files written before `use_regex` existed mean the default, True.
    return all(step.get(key, True if key == "use_regex" else None) == value for key, value in want.items())

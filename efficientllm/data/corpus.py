"""The built-in corpora, split into train and held-out BY FILE (a held-out file is never seen in
training, even in part) with a stable hash of the path relative to the corpus root, so the split
is the same on every machine.

- `stdlib`: the running interpreter's own standard-library `.py` sources. Every machine that
  runs this project has it, so the default job needs no download.
- `english_docs`: English prose, offline: the reST sources of the Python 3.11 documentation and
  of the Linux 6.1 kernel documentation (without its translations), from Debian's
  `python3.11-doc` and `linux-doc-6.1` packages (fetched once into the asset cache, not installed).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficientllm.data import DataError

CORPORA = ("stdlib", "english_docs")

# Tests and IDLE are skipped to keep the corpus to library code; `config-*` and
# `_sysconfigdata*` are generated per build, so skipping them keeps the corpus machine-independent.
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})


@dataclass(frozen=True)
class CorpusSplit:
    """The files of each part, as absolute paths in sorted order."""

    source: str
    root: Path
    train: tuple[Path, ...]
    heldout: tuple[Path, ...]
    heldout_fraction: float
    max_bytes: int | None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        files += [
            Path(directory, n)
            for n in names
            if n.endswith(".py") and not n.startswith("_sysconfigdata")
        ]
    return sorted(files)


def _unit_hash(salt: str, relative: str) -> float:
    """A number in [0, 1) fixed by the path alone (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{salt}:{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stdlib_corpus(
    heldout_fraction: float = 0.05, max_bytes: int | None = None, root: Path | None = None
) -> CorpusSplit:
    """Split the stdlib sources into train and held-out files (see `split_by_file`)."""
    root = stdlib_root() if root is None else Path(root)
    return split_by_file("python-stdlib", root, _source_files(root), heldout_fraction, max_bytes)


def _english_doc_files() -> tuple[Path, list[Path]]:
    from efficientllm import assets

    sources = [
        assets.debian_package("python3.11-doc") / "usr/share/doc/python3.11/html/_sources",
        assets.debian_package("linux-doc-6.1") / "usr/share/doc/linux-doc-6.1/html/_sources",
    ]
    files = [
        f for root in sources for f in sorted(root.rglob("*.rst.txt"))
        if "translations" not in f.relative_to(root).parts
    ]
    return assets.cache_dir() / "debian", files


def english_docs_corpus(heldout_fraction: float = 0.05, max_bytes: int | None = None) -> CorpusSplit:
    """Split the Python and Linux documentation sources into train and held-out files."""
    root, files = _english_doc_files()
    return split_by_file("english-docs", root, files, heldout_fraction, max_bytes)


def builtin_corpus(name: str, heldout_fraction: float = 0.05, max_bytes: int | None = None) -> CorpusSplit:
    """One of `CORPORA` by name."""
    if name == "stdlib":
        return stdlib_corpus(heldout_fraction, max_bytes)
    if name == "english_docs":
        return english_docs_corpus(heldout_fraction, max_bytes)
    raise DataError(f"data.corpus must be one of {', '.join(CORPORA)}, got {name!r}")


def split_by_file(
    source: str, root: Path, files: list[Path], heldout_fraction: float = 0.05, max_bytes: int | None = None
) -> CorpusSplit:
    """Split `files` (under `root`) into train and held-out files.

    With `max_bytes`, files are taken in a fixed pseudo-random order (a second hash, so the cap
    samples the whole library rather than its alphabetical start) while they fit the budget of
    their part: (1 - heldout_fraction) * max_bytes for train, the rest for held-out. A capped
    held-out set is thus a subset of the uncapped one and never meets any train set.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"corpus heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"corpus max_bytes must be positive or None, got {max_bytes}")
    if not files:
        raise DataError(f"no files of the {source} corpus under {root}")

    relative = {f: f.relative_to(root).as_posix() for f in files}
    is_heldout = {f: _unit_hash("split", relative[f]) < heldout_fraction for f in files}
    if max_bytes is not None:
        budget = {False: (1.0 - heldout_fraction) * max_bytes, True: heldout_fraction * max_bytes}
        taken = []
        for f in sorted(files, key=lambda f: _unit_hash("order", relative[f])):
            size = f.stat().st_size
            if size <= budget[is_heldout[f]]:
                budget[is_heldout[f]] -= size
                taken.append(f)
        files = sorted(taken)

    split = CorpusSplit(
        source=source,
        root=root,
        train=tuple(f for f in files if not is_heldout[f]),
        heldout=tuple(f for f in files if is_heldout[f]),
        heldout_fraction=heldout_fraction,
        max_bytes=max_bytes,
    )
    for name, part in (("train", split.train), ("held-out", split.heldout)):
        if not part:
            raise DataError(
                f"corpus max_bytes={max_bytes} leaves the {name} part of {root} empty; "
                f"raise max_bytes or change heldout_fraction={heldout_fraction}"
            )
    return split


def corpus_record(split: CorpusSplit) -> dict[str, Any]:
    """What the corpus is, for the run record; the caller adds token counts after tokenising."""
    return {
        "source": split.source,
        "python": platform.python_version(),
        "root": str(split.root),
        "heldout_fraction": split.heldout_fraction,
        "max_bytes": split.max_bytes,
        "train": {"files": len(split.train), "bytes": sum(f.stat().st_size for f in split.train)},
        "heldout": {
            "files": len(split.heldout),
            "bytes": sum(f.stat().st_size for f in split.heldout),
        },
    }

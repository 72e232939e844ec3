"""Outputs written so that no reader ever sees half of one: each file or directory is built
under a temporary name beside its destination and renamed into place when complete (a rename
within one directory is atomic on POSIX); a failed write leaves the previous output as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

OLD_SUFFIX = ".old"  # a replaced directory, between the two renames of `replace_dir`


def temporary_sibling(path: Path) -> Path:
    """A hidden name in `path`'s directory, private to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems do not allow syncing a directory
        pass


def write_atomically(path: str | Path, data: str | bytes, *, durable: bool = False) -> Path:
    """Write `data` to `path` through a temporary sibling. `durable`: also fsync the file and its
    directory, so that the new content survives a power loss (checkpoint metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete directory `src` to `dst`, replacing any `dst` there. A crash between
    the two renames leaves the previous version as `dst` + OLD_SUFFIX, for the owner to clean up."""
    if dst.exists():
        trash = dst.with_name(dst.name + OLD_SUFFIX)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(dst, trash)
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)
    fsync_dir(dst.parent)


def fresh_sibling_dir(dest: Path) -> Path:
    """An empty temporary directory beside `dest`, to build it in before `publish_dir`."""
    tmp = temporary_sibling(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, dest: Path) -> Path:
    """Rename the complete `tmp` to `dest`, a cache entry other processes may be building too:
    when one of them finished first its copy stands and ours is dropped."""
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():
            raise
    return dest

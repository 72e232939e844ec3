"""Every output goes through efficientllm.atomic: a failed write must leave the previous output
whole, a finished one must leave no temporary behind."""

from __future__ import annotations

import pytest

from efficientllm.atomic import OLD_SUFFIX, fresh_sibling_dir, publish_dir, replace_dir, write_atomically


class _Unwritable:
    """Data that fails half-way through a write (as a full disk would)."""


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "record.json"
    write_atomically(path, "first\n", durable=True)
    write_atomically(path, b"second\n")
    assert path.read_text() == "second\n"
    with pytest.raises(TypeError):
        write_atomically(path, _Unwritable())  # type: ignore[arg-type]
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


def test_a_directory_is_replaced_and_the_old_version_removed(tmp_path):
    dst = tmp_path / "report"
    for text in ("old", "new"):
        tmp = fresh_sibling_dir(dst)
        (tmp / "report.md").write_text(text)
        replace_dir(tmp, dst)
    assert (dst / "report.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert not dst.with_name(dst.name + OLD_SUFFIX).exists()


def test_a_cache_entry_another_process_published_first_stands(tmp_path):
    dest = tmp_path / "wheel"
    theirs = fresh_sibling_dir(dest)
    (theirs / "file").write_text("theirs")
    (theirs / "more").write_text("x")  # a non-empty dest: our rename onto it must fail
    publish_dir(theirs, dest)
    ours = fresh_sibling_dir(dest)
    (ours / "file").write_text("ours")
    assert publish_dir(ours, dest) == dest
    assert (dest / "file").read_text() == "theirs" and not ours.exists()

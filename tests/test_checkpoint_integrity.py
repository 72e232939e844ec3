"""Checkpoint integrity on one in-process rank: a CRC32 per file, verified on load; leftovers of
an interrupted replacement are removed."""

from __future__ import annotations

import json
import zlib

import pytest

from efficientllm.training import checkpoint
from efficientllm.training.checkpoint import CheckpointError
from tests.test_checkpoint import _step, trainer  # noqa: F401  (the fixture)


def test_the_manifest_holds_every_files_size_and_crc32(trainer):
    _step(trainer, 0)
    path = checkpoint.save(trainer, trainer.save_dir)
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {checkpoint.MANIFEST}
    assert set(files) == on_disk
    for name, record in files.items():
        data = (path / name).read_bytes()
        assert record == {"size": len(data), "crc32": zlib.crc32(data)}, name


def test_a_changed_byte_of_the_same_size_is_caught_and_fallback_loads_the_previous_one(trainer, capsys):
    for seed in (0, 1):
        _step(trainer, seed)
        checkpoint.save(trainer, trainer.save_dir)
    shard = sorted((trainer.save_dir / "iter_0000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt: its CRC32 differs.*fallback_to_previous"):
        checkpoint.find_checkpoint(trainer.save_dir)
    assert checkpoint.find_checkpoint(trainer.save_dir, fallback_to_previous=True).name == "iter_0000001"
    assert "falling back" in capsys.readouterr().out


def test_a_replaced_checkpoint_left_behind_by_a_crash_is_removed_by_the_next_save(trainer):
    _step(trainer, 0)
    checkpoint.save(trainer, trainer.save_dir)
    leftover = trainer.save_dir / "iter_0000001.old"  # what a crash inside replace_dir leaves
    (trainer.save_dir / "iter_0000001").rename(leftover)
    checkpoint.save(trainer, trainer.save_dir)
    assert not leftover.exists()
    assert checkpoint.complete_iterations(trainer.save_dir) == [1]

"""Atomic writes: missing parents are made, a failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import pytest

from rlhflab.core.io import atomic_dir, atomic_write_bytes, atomic_write_text


def test_missing_parent_directories_are_made(tmp_path):
    target = tmp_path / "a" / "b" / "report.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    with atomic_dir(tmp_path / "x" / "y" / "run") as tmp:
        (tmp / "f.txt").write_text("ok")
    assert (tmp_path / "x" / "y" / "run" / "f.txt").read_text() == "ok"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("rlhflab.core.io.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]

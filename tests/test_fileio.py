"""Atomic writes: a failure mid-write leaves the previous file intact and no temporary behind."""

import json

import pytest

from amorlip.fileio import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writers_create_parents_and_replace(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert target.read_text().endswith("\n")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failure_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_json_nan_is_refused_when_asked(tmp_path):
    target = tmp_path / "results.json"
    with pytest.raises(ValueError):
        atomic_write_json(target, {"acc": float("nan")}, allow_nan=False)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

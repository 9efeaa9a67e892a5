"""Atomic writes: a failure mid-write leaves the previous file intact and no temporary behind."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from amorlip.fileio import (
    OutputLockedError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    output_lock,
    partial_dir,
    read_jsonl,
    staged_dir,
)


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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_gives_open(tmp_path, umask, mode):
    """mkstemp made every output 0600 whatever the umask: unreadable to collaborators on a cluster."""
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "manifest.json", {"x": 1})
        with atomic_path(tmp_path / "model.pt") as tmp:
            tmp.write_bytes(b"weights")
        with open(tmp_path / "plain.txt", "w") as fh:  # what the user's umask means
            fh.write("x")
    finally:
        os.umask(old)
    for name in ("manifest.json", "model.pt", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_file_sha256_is_cached_by_stat_and_notices_edits(tmp_path):
    src, cache = tmp_path / "list.tsv", tmp_path / "cache" / "digests.json"
    src.write_bytes(b"url\tcaption\n")
    first = file_sha256(src, cache=cache)
    assert first == hashlib.sha256(b"url\tcaption\n").hexdigest()
    assert list(json.loads(cache.read_text()).values()) == [first]
    before = src.stat()
    src.write_bytes(b"url\tcaptioN\n")  # same size, content edited
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))  # even with an older mtime
    second = file_sha256(src, cache=cache)
    assert second == hashlib.sha256(b"url\tcaptioN\n").hexdigest() != first
    assert list(json.loads(cache.read_text()).values()) == [second], "one entry per file"
    cache.write_text("{not json")  # a broken cache is rebuilt, never trusted
    assert file_sha256(src, cache=cache) == second


_HOLD = """
import sys, time
from amorlip.fileio import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_of_the_same_output_fails_naming_the_first(tmp_path, capsys):
    """Two pipelines with the same absolute paths: the second stops at once with a clear message."""
    target = tmp_path / "data" / "cc3m" / "shards"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError) as info, output_lock(target):
            pytest.fail("the lock was granted twice")
        message = str(info.value)
        assert str(target) in message and f"pid {holder.pid}" in message and "another process" in message
        with output_lock(tmp_path / "data" / "cc12m" / "shards"):  # other outputs are not blocked
            pass
        # through a real command: one line, exit 1, before any work
        from amorlip.cli import main as cli_main

        config = tmp_path / "config.yaml"
        config.write_text("name: second-pipeline\n")
        rc = cli_main(["source", "--config", str(config), "--dataset", "emoji-demo", "--out", str(target)])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.startswith(f"amorlip: {target} is being written by another process"), err
        assert "\n" not in err and not target.exists()
    finally:
        holder.kill()  # SIGKILL: no handler runs, yet the kernel drops the lock
        holder.wait()
    with output_lock(target):
        pass


def test_read_jsonl_skips_blank_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []  # no file yet
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')  # a kill cut the last append
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_staged_dir_publishes_on_success_only_and_resumes_an_existing_folder(tmp_path):
    final = tmp_path / "shards"
    with pytest.raises(RuntimeError), staged_dir(final) as work:
        (work / "00000.tar").parent.mkdir()
        (work / "00000.tar").write_text("done")
        raise RuntimeError("stopped at the time limit")
    assert not final.exists() and (partial_dir(final) / "00000.tar").read_text() == "done"
    with staged_dir(final) as work:  # the next attempt finds its shard where it left it
        assert (work / "00000.tar").read_text() == "done"
        (work / "00001.tar").write_text("done")
    assert sorted(p.name for p in final.iterdir()) == ["00000.tar", "00001.tar"]
    assert not partial_dir(final).exists()
    with staged_dir(final) as work:  # a finished folder is checked in the work folder and moved back
        assert sorted(p.name for p in work.iterdir()) == ["00000.tar", "00001.tar"] and not final.exists()
    assert final.is_dir()
    partial_dir(final).mkdir()
    with pytest.raises(FileExistsError, match=r"shards\.partial is an unfinished attempt"), staged_dir(final):
        pass

"""Disk full during a checkpoint write: the previous checkpoint stays usable and the error says so.

torch reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected
pos``, without the errno, so the trainer's message adds the free space it finds on that filesystem.

The run's ``checkpoints/`` folder is a real, small filesystem: a tmpfs mounted there (root only).
Right after the first checkpoint completes, the trainer is frozen (SIGSTOP), a filler file takes
every free byte, and the trainer continues: its next save meets ENOSPC mid-write, as when another
job fills a shared scratch disk. Then the filler is deleted (the user frees space) and a rerun must
resume from the previous checkpoint and finish.

Without the right to mount (not root, or a container without CAP_SYS_ADMIN) the same moment is
produced with RLIMIT_FSIZE set on the frozen trainer (``prlimit``): its next large write fails with
EFBIG instead of ENOSPC, through the same code path. The test prints which one ran.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from amorlip.train import checkpoint as ckpt

from .conftest import run_dir, train_job, wait_for, write_tiny_config


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "160m") -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``where``; yields False (nothing mounted) when mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        mounted = res.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> int:
    """Write a filler file until the filesystem refuses; returns the bytes it took."""
    written = 0
    block = b"\0" * (1 << 20)
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                written += fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, mlflow_template_db):
    config = write_tiny_config(tmp_path, run_overrides={"epochs": 1, "checkpoint_every": 3})
    ckpt_dir = run_dir(tmp_path) / "checkpoints"
    with small_filesystem(ckpt_dir) as mounted:
        job = train_job(config, "tiny-run", tmp_path / "attempt-1.log")
        first = ckpt.tag_for(3)
        wait_for(lambda: (ckpt_dir / first / ckpt.COMPLETE_MARKER).exists(), 240, interval=0.01,
                 what=f"checkpoint {first}", proc=job.proc)
        job.signal(signal.SIGSTOP)
        if mounted:
            how = f"tmpfs full ({fill(ckpt_dir) / 2**20:.0f} MiB filler)"
        else:
            resource.prlimit(job.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            how = "RLIMIT_FSIZE 1 MiB (no mount permission)"
        job.signal(signal.SIGCONT)
        rc = job.wait(240)
        text = job.text()
        assert rc != 0, text[-3000:]
        # the error names the failed write, the cause, the checkpoint that is still good, and the fix
        assert f"could not write checkpoint {ckpt.tag_for(6)}" in text, text[-3000:]
        free = re.search(r"\(([0-9.]+) MiB free on that filesystem\)", text)
        assert free, text[-3000:]
        if mounted:
            assert float(free.group(1)) < 1.0, free.group(0)
        assert f"previous complete checkpoint ({first}) is untouched" in text, text[-3000:]
        assert ckpt.latest_complete_tag(ckpt_dir) == first
        # the user frees space and reruns: it resumes from the previous checkpoint and finishes
        with contextlib.suppress(FileNotFoundError):
            (ckpt_dir / "filler").unlink()
        job2 = train_job(config, "tiny-run", tmp_path / "attempt-2.log")
        rc2 = job2.wait(300)
        text2 = job2.text()
        assert rc2 == 0, text2[-3000:]
        assert f"resumed from {first}" in text2
        assert (run_dir(tmp_path) / "train.json").exists()
    print(f"\ndisk full by {how} while writing {ckpt.tag_for(6)}: exit {rc}; {first} kept; "
          f"the rerun resumed from it and finished")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_small_filesystem_is_really_small(tmp_path):
    """The disk-full test is only as good as its filesystem: a tmpfs of 1 MiB refuses the second MiB."""
    with small_filesystem(tmp_path / "fs", "1m") as mounted:
        if not mounted:
            pytest.skip("mount refused in this container")
        assert fill(tmp_path / "fs") <= 1 << 20

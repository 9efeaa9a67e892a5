"""Session fixtures shared across the suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tinydata import REPO, TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """config/tiny.yaml's data stage (corpus, img2dataset shards, index, held-out eval sets), built
    once per session through the real Snakefile. Tests copy ``data/`` and ``resources/`` with
    :func:`tinydata.copy_tiny_data` (mtimes kept, so Snakemake sees them as up to date)."""
    root = tmp_path_factory.mktemp("tiny-data")
    shutil.copy(TINY_CONFIG, root / "config.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory",
           str(root), "--configfile", str(root / "config.yaml"), "--cores", "2", "data"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


class OneRankWorld:
    """A one-rank gloo process group in this process, made by amorlip.distributed.make_world as
    `amorlip train` makes it, for tests that drive a real DeepSpeed engine in process (the task tests).

    make_world exports the launch variables (RANK, LOCAL_RANK, MASTER_PORT, ...), and DeepSpeed reads
    them again when it builds an engine; they are set only inside :meth:`launched`, so subprocesses
    started by other tests never inherit them.
    """

    def __init__(self) -> None:
        self._launch: dict[str, str] = {}

    @contextlib.contextmanager
    def launched(self):
        saved = dict(os.environ)
        os.environ.update(self._launch)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def world(self, global_batch: int):
        from amorlip.distributed import make_world

        with self.launched():
            world = make_world(global_batch, 1, what="a task test")
            self._launch = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                       "MASTER_PORT", "DS_ACCELERATOR") if k in os.environ}
        return world


@pytest.fixture(scope="session")
def one_rank_world():
    """One :class:`OneRankWorld` for the session: DeepSpeed caches the world group it first sees, so a
    group destroyed and made again would leave it holding a dead one. Destroyed at the end."""
    import torch.distributed as dist

    try:
        yield OneRankWorld()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

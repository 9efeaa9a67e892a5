"""Session fixtures shared across the suite."""

from __future__ import annotations

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

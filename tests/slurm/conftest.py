"""Fixtures for the tests against the real local SLURM cluster (helpers: slurm_helpers.py).

`make test` (scripts/run-tests.sh) starts the cluster with scripts/slurm-up.sh when it can, so these
tests run there; they skip when no cluster answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from slurm_helpers import cluster_problem, run_snakemake, tiny_config


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, slurm_cluster) -> Path:
    """The tiny data set and held-out eval sets, built once per session with the local executor.

    Tests copy ``data/`` and ``resources/`` (mtimes kept, so Snakemake sees them as up to date) and
    only run the later stages through SLURM, which keeps the SLURM tests within minutes.
    """
    root = tmp_path_factory.mktemp("tiny-data")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    code, sm = run_snakemake(root, "--cores", "2", "data", "data/evalsets/emoji-heldout/tasks.json",
                             profile=None, configfile=config, timeout=600)
    assert code == 0, sm.tail()
    return root

"""Fixtures for the tests against the real local SLURM cluster (helpers: slurm_helpers.py).

`make test` (scripts/run-tests.sh) starts the cluster with scripts/slurm-up.sh when it can, so these
tests run there; they skip when no cluster answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_helpers import cluster_problem


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def slurm_tiny_data(tiny_data: Path, slurm_cluster) -> Path:
    """The suite's shared tiny data (tests/conftest.py), requested only when a cluster answers.

    Tests copy ``data/`` and ``resources/`` (mtimes kept, so Snakemake sees them as up to date) and
    only run the later stages through SLURM, which keeps the SLURM tests within minutes.
    """
    return tiny_data

"""The suite's tiny pipeline config and its shared data (built once by the ``tiny_data`` fixture)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "config" / "tiny.yaml"


def copy_tiny_data(src: Path, dst: Path) -> None:
    for name in ("data", "resources"):
        shutil.copytree(src / name, dst / name, symlinks=True, copy_function=shutil.copy2)


def tiny_config() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text())

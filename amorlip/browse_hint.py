"""The command that opens the pipeline's runs in the MLflow UI, printed as it must be typed.

`make demo` installs MLflow into ``.venv`` only, so a bare ``mlflow ui`` fails on a fresh machine
(command not found, or another install's MLflow). The hint names the ``mlflow`` executable beside
the Python that runs amorlip (relative to the current directory when it lies below it, so the
command works as printed from the repository root) and the pipeline's store URI (a relative SQLite
path resolves against the same directory). A tracking server (``http(s)://``) needs no command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amorlip.config import tracking_uri

DEFAULT_PORT = 5000  # MLflow's own default


def mlflow_executable(cwd: str | os.PathLike | None = None) -> str:
    """``.venv/bin/mlflow`` (relative to ``cwd`` when below it), else the absolute path, else ``mlflow``."""
    exe = Path(sys.executable).with_name("mlflow")  # not resolved: a venv's python is a symlink
    if not exe.exists():
        return "mlflow"
    cwd = Path(cwd or os.getcwd()).absolute()
    try:
        return str(exe.absolute().relative_to(cwd))
    except ValueError:
        return str(exe.absolute())


def browse_lines(config: Mapping[str, Any], port: int = DEFAULT_PORT, cwd: str | os.PathLike | None = None) -> list[str]:
    """The lines to print: the command (or the server's address) and the address to open."""
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        return [f"  open {uri} in a browser (the pipeline logs to this tracking server)"]
    return [f"  {mlflow_executable(cwd)} ui --backend-store-uri {uri} --port {port}",
            f"  then open http://127.0.0.1:{port} (another port if {port} is taken: --port N)"]


def print_browse_hint(config: Mapping[str, Any]) -> None:
    print("Browse every run in MLflow (the pipeline's parent run, one child per train / evaluate job):")
    for line in browse_lines(config):
        print(line)

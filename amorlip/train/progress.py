"""What a training run leaves for people: the progress bar and metrics.jsonl (its figure is drawn by
:func:`amorlip.loss_curves.plot_run_curves`).

``metrics.jsonl`` is the local record of every logged step (one JSON object per line), written
whether or not MLflow is reachable. After a resume it is cut back to the checkpoint's step, so the
file never holds two entries for one step (a killed attempt may have logged steps past its last
checkpoint; they are trained again).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from amorlip.fileio import atomic_write_text, read_jsonl

log = logging.getLogger(__name__)


class MetricsFile:
    """Append-only JSONL of logged steps (rank 0)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def truncate_after(self, step: int) -> int:
        """Drop entries with ``step`` greater than ``step`` (a resumed run redoes them); returns kept."""
        if not self.path.exists():
            return 0
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return len(kept)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")

    def read(self) -> list[dict]:
        """Every record, skipping a line cut by a kill (:func:`amorlip.fileio.read_jsonl`)."""
        return read_jsonl(self.path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _as_float(value: Any) -> float:
    return float(value.detach() if hasattr(value, "detach") else value)


def loss_terms(out: Mapping[str, Any]) -> dict[str, float]:
    """The named losses of a task's output as floats (``loss`` plus every ``*_loss``).

    Reads the device: call it when a step has failed or on logging steps, not every step.
    """
    terms = {"loss": _as_float(out["loss"])}
    for key, value in out.items():
        if key.endswith("_loss") and not isinstance(value, bool):
            terms[key] = _as_float(value)
    return terms


def nonfinite_terms(out: Mapping[str, Any]) -> dict[str, float]:
    """Loss terms that are NaN or infinite (empty when the step is healthy)."""
    return {k: v for k, v in loss_terms(out).items() if not math.isfinite(v)}


class Progress:
    """tqdm on rank 0 (step, loss, images/s, ETA); silent elsewhere.

    In a log file (Snakemake's ``log:``) the bar is refreshed every 10 s instead of continuously.
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0,
                        file=sys.stderr)

    def update(self, images_per_s: float, epoch: int, loss: float | None = None) -> None:
        """One step done; ``loss`` (the last logged mean) only on logging steps, where it was read anyway."""
        if loss is not None:
            self.loss = loss
        postfix = {"img/s": f"{images_per_s:.1f}", "epoch": epoch}
        if getattr(self, "loss", None) is not None:
            postfix = {"loss": f"{self.loss:.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Images per second over the steps since the last :meth:`rate` call (global batch)."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.t0 = time.monotonic()
        self.steps = 0
        self.last = 0.0

    def step(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        if self.steps and elapsed > 0:
            self.last = self.steps * self.global_batch / elapsed
        self.t0, self.steps = time.monotonic(), 0
        return self.last

    def peek(self) -> float:
        elapsed = time.monotonic() - self.t0
        return self.steps * self.global_batch / elapsed if self.steps and elapsed > 0 else self.last

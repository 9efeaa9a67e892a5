"""Checkpoints that a killed job can trust: DeepSpeed tags + a completion marker + per-rank RNG.

Layout of ``runs/{run}/checkpoints/``::

    step-0000040/                  one DeepSpeed tag (model states, per-rank ZeRO optimizer shards)
        complete                   written by rank 0 after every rank finished saving (JSON)
        rng-rank{r}.pt             each rank's torch / numpy / python / CUDA RNG states
    latest                         DeepSpeed's own pointer (kept for its tools, never trusted)

Why the marker: a job killed while writing (OOM killer, ``kill -9``, a node failure) leaves a tag
directory that looks fine but misses files, and DeepSpeed writes ``latest`` before every rank is
done. Resume only ever considers tags with a ``complete`` file and passes the tag explicitly.

Everything the trainer adds (step, data position, lambda nets, counters, run config) travels in
DeepSpeed's ``client_state`` as plain types; DeepSpeed itself loads its files with
``weights_only=False`` (its optimizer state holds non-tensor objects), while our RNG files and the
exported model load with ``weights_only=True``. Unpickling runs code, so the marker also records the
sha256 of every file of the tag, and a resume verifies them before DeepSpeed opens anything: it
only ever unpickles files this trainer wrote (a file changed, added or removed afterwards stops the
resume, naming it).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amorlip import distributed as dist_utils
from amorlip.fileio import file_sha256

log = logging.getLogger(__name__)

COMPLETE_MARKER = "complete"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact."""


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint's files are not the ones its marker recorded; nothing of it was loaded."""


_TAG_RE = re.compile(r"^step-(\d+)$")


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def step_of(tag: str) -> int | None:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Tags with a completion marker, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir()
            if p.is_dir() and step_of(p.name) is not None and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=step_of)


def latest_complete_tag(ckpt_dir: str | os.PathLike) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def torn_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Tag directories without a marker: interrupted saves, never resumed from."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None
                   and not (p / COMPLETE_MARKER).is_file()), key=step_of)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
                    keep: int) -> str:
    """Save tag ``step-NNNNNNN`` on every rank (DeepSpeed hangs if only one rank saves).

    Order: (rank 0 clears a torn directory of the same tag) -> barrier -> DeepSpeed save + each
    rank's RNG file -> barrier -> rank 0 writes the marker atomically, prunes old tags -> barrier.
    Returns the tag.
    """
    root = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    if dist_utils.is_master():
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists() and not (tag_dir / COMPLETE_MARKER).exists():
            shutil.rmtree(tag_dir)  # leftovers of a torn save: never mix old and new files
    previous = latest_complete_tag(root)
    dist_utils.barrier()
    t0 = time.monotonic()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
        torch.save(rng_state(), tag_dir / f"rng-rank{dist_utils.rank()}.pt")
    except (OSError, RuntimeError) as exc:
        # torch reports a full disk as "[enforce fail at inline_container.cc] ... unexpected pos",
        # without the errno: add what the filesystem says
        raise CheckpointWriteError(_write_failure(root, tag, previous, exc)) from exc
    dist_utils.barrier()
    if dist_utils.is_master():
        try:
            files = file_digests(tag_dir)
        except OSError as exc:
            raise CheckpointWriteError(_write_failure(root, tag, previous, exc)) from exc
        marker = {"step": step, "world_size": dist_utils.world_size(), "time": time.time(),
                  "save_s": round(time.monotonic() - t0, 3), "files": files}
        tmp = tag_dir / f".{COMPLETE_MARKER}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(marker, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, tag_dir / COMPLETE_MARKER)
        except OSError as exc:
            raise CheckpointWriteError(_write_failure(root, tag, previous, exc)) from exc
        prune(root, keep)
        log.info("checkpoint %s saved (%.1fs)", tag, time.monotonic() - t0)
    dist_utils.barrier()
    return tag


def _write_failure(root: Path, tag: str, previous: str | None, exc: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free on that filesystem"
    except OSError:
        free = "free space unknown"
    cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    kept = (f"the previous complete checkpoint ({previous}) is untouched and a rerun resumes from it"
            if previous else "there is no earlier complete checkpoint; a rerun starts from step 0")
    return (f"could not write checkpoint {tag} in {root}: {type(exc).__name__}: {cause} ({free}); {kept}. "
            "Free space (or raise the quota) and rerun; lower keep_checkpoints to need less.")


def prune(ckpt_dir: str | os.PathLike, keep: int) -> list[str]:
    """Keep the newest ``keep`` complete tags; drop older ones and torn tags older than the newest."""
    root = Path(ckpt_dir)
    tags = complete_tags(root)
    removed = []
    doomed = tags[:-keep] if keep > 0 else []
    newest = step_of(tags[-1]) if tags else None
    if newest is not None:
        doomed += [t for t in torn_tags(root) if step_of(t) < newest]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
        removed.append(tag)
    return removed


def load_checkpoint(engine, ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Any]:
    """Load ``tag`` into ``engine`` (module, ZeRO optimizer) on every rank; restore this rank's RNG.

    Returns the client state. Raises :class:`CheckpointIntegrityError` before DeepSpeed opens
    anything if a file differs from what the marker recorded, and RuntimeError if DeepSpeed cannot
    read the tag.
    """
    verify_checkpoint(ckpt_dir, tag)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng-rank{dist_utils.rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # a different world size than at save time: ranks keep their fresh seeds
        log.warning("no RNG state for rank %d in %s; keeping this rank's seeded state", dist_utils.rank(), tag)
    return client_state


def marker_world_size(ckpt_dir: str | os.PathLike, tag: str) -> int | None:
    """The rank count recorded in ``tag``'s completion marker (read before DeepSpeed opens anything)."""
    try:
        value = json.loads((Path(ckpt_dir) / tag / COMPLETE_MARKER).read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


# --------------------------------------------------------------------------- file digests


def _tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag (relative, sorted) except the marker and its temporary."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.name not in (COMPLETE_MARKER, f".{COMPLETE_MARKER}.tmp"))


def file_digests(tag_dir: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a tag, hashed on a few threads (hashlib
    releases the GIL; a ZeRO checkpoint of a ViT-B is a few GB)."""
    tag_dir = Path(tag_dir)
    names = _tag_files(tag_dir)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        digests = list(pool.map(lambda name: file_sha256(tag_dir / name), names))
    return dict(zip(names, digests))


def verify_checkpoint(ckpt_dir: str | os.PathLike, tag: str) -> None:
    """Raise :class:`CheckpointIntegrityError` unless ``tag``'s files are exactly those its marker lists,
    with the recorded sha256.

    Called by every rank before DeepSpeed loads: each rank unpickles every ZeRO optimizer shard with
    ``weights_only=False`` (and code can run while unpickling), so each checks what it is about to
    read. A marker without digests (written before they were recorded) is refused as well: nothing
    would tell its files from replaced ones.
    """
    tag_dir = Path(ckpt_dir) / tag
    fix = (f"delete {tag_dir} to resume from the previous complete checkpoint, or {Path(ckpt_dir)} to "
           "start over")
    try:
        marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointIntegrityError(f"checkpoint {tag_dir}: its completion marker is unreadable ({exc}); "
                                       f"{fix}") from None
    recorded = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        raise CheckpointIntegrityError(
            f"checkpoint {tag_dir}: its marker records no file digests (written by an older amorlip, or "
            f"edited), so its files cannot be told from replaced ones and are not unpickled; {fix}")
    actual = file_digests(tag_dir)
    present = set(actual)
    extra = sorted(present - set(recorded))
    if extra:
        raise CheckpointIntegrityError(
            f"checkpoint {tag_dir}: {extra[0]} was not written by the trainer (not in the marker"
            f"{f', nor {len(extra) - 1} more' if len(extra) > 1 else ''}); it is not loaded: remove it, or {fix}")
    for name in sorted(recorded):
        if name not in present:
            raise CheckpointIntegrityError(f"checkpoint {tag_dir}: {name} is missing; {fix}")
        if actual[name] != recorded[name]:
            raise CheckpointIntegrityError(
                f"checkpoint {tag_dir}: {name} changed after the checkpoint was saved (its sha256 differs "
                f"from the one in the marker); it is not loaded, since unpickling a foreign file can run "
                f"code. {fix[0].upper()}{fix[1:]}")

"""Atomic file writes: a reader (or a killed job's rerun) never sees a half-written output.

Every output a Snakemake rule, a resumed run or a report reads is written to a temporary file
beside its final path and renamed into place (``os.replace`` is atomic on one file system), so a
kill at any moment leaves either the old file or the new one, never a torn one that looks done.
Append-only JSONL files (``metrics.jsonl``) are the exception: :func:`read_jsonl` reads them
whatever a kill left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _create_temporary(path: Path) -> Path:
    """Create an empty, unique ``.<name>.<random>.tmp`` beside ``path`` with the mode a plain
    ``open(path, "w")`` would give it.

    ``tempfile.mkstemp`` creates files with mode 0600 whatever the umask, and the rename carries
    that mode onto the output: manifests, models and summaries became unreadable to collaborators
    on a shared cluster. ``os.open(..., 0o666)`` lets the umask (and a default ACL) decide, as for
    any other file the user writes; ``O_EXCL`` keeps the name unique as ``mkstemp`` does.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    For writers that want a file name (``torch.save``, ``csv`` through ``open``, a validation read
    of the finished temporary file before it replaces the old one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Write ``obj`` as indented JSON with a final newline; ``dumps_kwargs`` go to ``json.dumps``
    (``allow_nan=False`` where a NaN must fail loudly rather than land as a non-JSON token)."""
    dumps_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file, one per line; ``[]`` when the file does not exist.

    Blank lines and lines that do not parse are skipped: an append-only file (``metrics.jsonl``)
    can end in a line cut by a kill, and the records before it are still worth reading.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def file_sha256(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """The sha256 of a file's content; with ``cache`` (a JSON file), remembered per path and stat.

    The Snakefile digests url lists to notice edits; CC12M's list is 2.6 GB, so the digest is only
    recomputed when the file's size, mtime or inode changed. A corrupt or missing cache is rebuilt.
    """
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    known: dict[str, str] = {}
    if cache is not None:
        with contextlib.suppress(OSError, ValueError):
            known = dict(json.loads(Path(cache).read_text()))
        if key in known:
            return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        prefix = f"{path.resolve()}|"
        known = {k: v for k, v in known.items() if not k.startswith(prefix)}
        known[key] = digest
        with contextlib.suppress(OSError):  # only a cache: a read-only results folder costs a rehash
            atomic_write_json(cache, known, sort_keys=True)
    return digest


PARTIAL_SUFFIX = ".partial"


def partial_dir(final: str | os.PathLike) -> Path:
    """The work folder :func:`staged_dir` builds ``final`` in: ``<final>.partial`` beside it."""
    final = Path(final)
    return final.with_name(final.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in ``<final>.partial`` and move it to ``final`` only when the body succeeds.

    Why: a workflow manager deletes the declared output of a failed job (Snakemake does, before its
    retry), so a download killed at its SLURM time limit would lose every finished shard with its
    output folder. The work folder is not an output: it survives the failure and the next attempt
    resumes in it. A ``final`` that already exists (a finished download, one made before staging, or a
    copy) is moved into the work folder first, so it is checked and completed the same way. The move
    is a rename on one filesystem: nothing is copied.
    """
    final = Path(final)
    work = partial_dir(final)
    if final.exists() and work.exists():
        raise FileExistsError(
            f"both {final} and {work} exist: {work} is an unfinished attempt at {final}. Keep one (delete "
            f"the other: {final} if it is older, else {work}) and run again")
    if final.exists():
        os.replace(final, work)
    yield work
    os.replace(work, final)


class OutputLockedError(RuntimeError):
    """Another process (another pipeline sharing these paths) is writing the same output."""


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (an output file or folder) while writing it, or fail at once.

    Snakemake locks outputs per working directory only: two pipelines started from two folders
    with the same absolute ``paths`` would both write ``urls.parquet`` or the same shards, and fail
    later with errors that do not say why (or, worse, interleave). The lock is a POSIX record lock on
    ``.<name>.lock`` beside ``path``: the kernel releases it when the holder exits, however it dies
    (``kill -9`` included), it is not inherited by forked workers, and it works over NFS. The file
    names the holder, so the message can say who it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except PermissionError:
        fd = None
    if fd is None:
        # a collaborator's lock file we may not write: the lock cannot be taken, so it is skipped
        # rather than failing the job (writing the output itself says whether we may)
        yield
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise OutputLockedError(
                f"{path} is being written by another process ({holder}): two pipelines share this path "
                "(the same absolute data/runs/results/resources folder). Wait for the other one to "
                "finish, then rerun; or give this config its own paths") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, cwd {os.getcwd()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock

"""Put every shard's samples in key order, so the training data order does not depend on download timing.

img2dataset assigns url-list rows to shards by position (shard ``i`` holds rows ``i*n .. i*n+n-1``)
and names each sample after its row (``compute_key``: the shard id, then the row's offset in it),
so *which* samples a shard holds is already fixed by the url list and the download outcome. The
*order* inside a tar is not: a shard's downloads run in a thread pool and are written as they
complete, and the loader reads a tar front to back, so two downloads of the same list fed the
trainer different batches. :func:`canonicalize_shards`, called by the index step, rewrites each tar
with its samples in key order (each key's members together, in extension order) and with fixed
headers (mtime 0, uid/gid 0, no owner names, mode 0444), so the shard contents read by the loader
are a function of the url list and the download outcome alone.

Each shard keeps its name and its sample set, so its ``NNNNN_stats.json`` and ``NNNNN.parquet``
(the failure accounting the index reads) stay true without being rewritten. A shard is replaced
atomically (a temporary tar beside it, checked, then renamed onto it): a kill leaves every tar
complete, some in download order and some in key order. The caller names the index files that
must not survive such a state (``stale``): they are deleted before the first tar is rewritten and
written again only after the last, so an interrupted reshard never leaves a set that looks indexed,
and a rerun finishes it (a tar already in canonical form is read, never rewritten).

The pass also digests what the loader will read (``samples_sha256``: each sample's shard, key,
image and caption bytes, in key order), which the manifest records as the identity of the
downloaded sample set. The ``.json`` members are left out of the digest: img2dataset writes the
fetched url into them, and the emoji demo's loopback server listens on a different port each run.
Cost: one sequential read of every shard (and one write of those not yet canonical) at index time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from amorlip.data import IMAGE_EXTENSIONS
from amorlip.fileio import atomic_path

log = logging.getLogger(__name__)

_MODE = 0o444


def split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name, split at the first dot of the basename, as the loader
    and webdataset group members into samples."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _is_canonical(members: list[tarfile.TarInfo]) -> bool:
    names = [split_name(m.name) for m in members]
    return names == sorted(names) and all(
        m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.uname and not m.gname and m.mode == _MODE
        for m in members)


def _canonical_info(member: tarfile.TarInfo) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name)
    info.size, info.mode, info.mtime = member.size, _MODE, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _digest_lines(tf: tarfile.TarFile, members: list[tarfile.TarInfo], shard: str) -> Iterable[bytes]:
    """One line per image or caption member: ``shard key ext sha256``, in the members' order."""
    for m in members:
        key, ext = split_name(m.name)
        if ext.lower() in (*IMAGE_EXTENSIONS, "txt"):
            digest = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
            yield f"{shard}\t{key}\t{ext.lower()}\t{digest}\n".encode()


def canonicalize_shard(tar_path: str | os.PathLike, digest: hashlib._Hash | None = None,
                       before_rewrite: Callable[[], None] | None = None) -> bool:
    """Rewrite one tar in key order with fixed headers unless it already is; return whether it was
    rewritten. ``digest`` (a hashlib object) is fed the shard's sample lines in key order;
    ``before_rewrite`` is called just before a rewrite starts."""
    tar_path = Path(tar_path)
    with tarfile.open(tar_path, "r:") as src:
        members = [m for m in src.getmembers() if m.isfile()]
        ordered = sorted(members, key=lambda m: split_name(m.name))  # stable: duplicates keep their order
        if digest is not None:
            for line in _digest_lines(src, ordered, tar_path.name):
                digest.update(line)
        if _is_canonical(members):
            return False
        if before_rewrite is not None:
            before_rewrite()
        with atomic_path(tar_path) as tmp:
            with open(tmp, "wb") as fh:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as dst:
                    for m in ordered:
                        dst.addfile(_canonical_info(m), src.extractfile(m))
                fh.flush()
                os.fsync(fh.fileno())
            with tarfile.open(tmp, "r:") as check:
                written = [(m.name, m.size) for m in check.getmembers() if m.isfile()]
            if written != [(m.name, m.size) for m in ordered]:
                raise RuntimeError(f"reshard: rewriting {tar_path} lost members; the original is kept")
    return True


def canonicalize_shards(shards_dir: str | os.PathLike, shards: Iterable[str],
                        stale: Iterable[str | os.PathLike] = ()) -> dict:
    """Put the tars ``{shard}.tar`` (``shard`` = ``"00000"`` ...) of ``shards_dir`` in canonical key order.

    ``stale``: files (e.g. sizes.json, manifest.json) deleted before the first tar is rewritten, so
    that an interrupted pass leaves no index that claims the set is ready. Returns ``{"rewritten":
    n, "shards": n, "samples_sha256": hex}``; the digest covers the shards in name order.
    """
    shards_dir = Path(shards_dir)
    for leftover in shards_dir.glob(".*.tar.*.tmp"):  # a temporary tar of a killed pass
        leftover.unlink(missing_ok=True)
    stale = [Path(p) for p in stale]

    def invalidate() -> None:
        for path in stale:
            path.unlink(missing_ok=True)

    digest = hashlib.sha256()
    names = sorted(shards)
    rewritten = 0
    for shard in names:
        rewritten += canonicalize_shard(shards_dir / f"{shard}.tar", digest, before_rewrite=invalidate)
    log.info("reshard %s: %d of %d shard(s) rewritten in key order", shards_dir, rewritten, len(names))
    return {"rewritten": rewritten, "shards": len(names), "samples_sha256": digest.hexdigest()}

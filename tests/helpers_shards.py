"""Build tiny, real img2dataset-like webdataset shards for tests (no download needed).

``make_shards(folder, n_shards, per_shard)`` writes ``00000.tar ...`` (members ``<key>.jpg``,
``<key>.txt``, ``<key>.json``, grouped by key as img2dataset writes them), ``NNNNN_stats.json``,
``NNNNN.parquet``, ``sizes.json`` and the download's ``download.plan`` into ``folder``, and returns
the keys a correct loader must yield (every written sample minus the corrupt ones). Keys follow
img2dataset: 5-digit shard + 4-digit index.

``corrupt`` maps a kind to the shard it damages (one sample per kind, or the tar's tail):
``garbage_image`` (HTML bytes as .jpg), ``truncated_image`` (a JPEG cut in half), ``empty_caption``,
``missing_txt``, ``missing_image`` (only .txt/.json), ``truncated_tar`` (the tar cut inside its last
sample's image, as after a failed copy; sizes.json still counts that sample, as the index did).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

CORRUPT_KINDS = ("garbage_image", "truncated_image", "empty_caption", "missing_txt", "missing_image",
                 "truncated_tar")
_WORDS = ["red", "green", "blue", "small", "large", "cat", "dog", "tree", "car", "house", "bird", "boat"]


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    colour = rng.integers(0, 256, size=3)
    pixels = np.clip(colour + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def make_shards(folder: str | Path, n_shards: int, per_shard: int, image_size: int = 32, seed: int = 0,
                corrupt: Mapping[str, int] | None = None) -> list[str]:
    """Write ``n_shards`` shards of ``per_shard`` samples into ``folder``; return the loadable keys."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = dict(corrupt or {})
    unknown = set(corrupt) - set(CORRUPT_KINDS)
    if unknown:
        raise ValueError(f"unknown corrupt kind(s) {sorted(unknown)}; known: {CORRUPT_KINDS}")
    rng = np.random.default_rng(seed)
    good: list[str] = []
    sizes: dict[str, int] = {}
    for shard in range(n_shards):
        # each per-sample kind damages its own sample index (1, 2, ...) of the shard it names
        damaged = {i + 1: kind for i, kind in enumerate(k for k in CORRUPT_KINDS if k != "truncated_tar")
                   if corrupt.get(kind) == shard}
        if max(damaged, default=0) >= per_shard:
            raise ValueError(f"per_shard={per_shard} is too small for {len(damaged)} corrupt samples")
        tar_path = folder / f"{shard:05d}.tar"
        rows = []
        images = 0
        last_image = None  # (sample index, data offset, size) of the last image member
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                kind = damaged.get(i)
                caption = " ".join(rng.choice(_WORDS, size=3)) + f" {key}"
                image = _jpeg(rng, image_size)
                if kind == "garbage_image":
                    image = b"<html><body>404 not found</body></html>"
                elif kind == "truncated_image":
                    image = image[: len(image) // 2]
                elif kind == "empty_caption":
                    caption = "  "
                meta = {"key": key, "caption": caption, "url": f"http://127.0.0.1/{key}.jpg",
                        "status": "success", "error_message": None, "width": image_size, "height": image_size}
                if kind != "missing_image":
                    last_image = (i, tf.offset + 512, len(image))  # data follows the 512-byte header
                    _add(tf, f"{key}.jpg", image)
                    images += 1
                if kind != "missing_txt":
                    _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
                rows.append({"key": key, "caption": caption, "url": meta["url"], "status": "success",
                             "error_message": None})
                if kind is None:
                    good.append(key)
        if corrupt.get("truncated_tar") == shard:
            index, offset, size = last_image
            with open(tar_path, "r+b") as fh:
                fh.truncate(offset + size // 2)
            good = [k for k in good if not (k.startswith(f"{shard:05d}") and int(k[5:]) >= index)]
        stats = {"count": per_shard, "successes": images, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": 0.1, "start_time": 0.0, "end_time": 0.1, "status_dict": {"success": images}}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        _write_parquet(folder / f"{shard:05d}.parquet", rows)
        sizes[tar_path.name] = images
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=2))
    # what `amorlip download` writes beside its shards; the index checks every url is accounted for
    (folder / "download.plan").write_text(json.dumps({"urls": n_shards * per_shard, "samples_per_shard": per_shard,
                                                      "shards": n_shards, "url_digest": None}))
    return good


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)

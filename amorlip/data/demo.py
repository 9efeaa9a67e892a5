"""The offline demo corpus: emoji training views in two art styles, eval sets in a third.

No photo data set can be downloaded here, so the demo trains on emoji art from packages
(:mod:`amorlip.data.emoji_art`) and evaluates zero-shot on an art style it never saw: the
category / subcategory classification and name retrieval scores then measure generalisation, not
memorised pixels. Training images are written as files listed in ``urls.parquet`` with paths
relative to it; the download rule serves them over loopback HTTP so the demo takes exactly the
path a CC3M url list takes. Everything is deterministic given ``emoji.seed``: each view draws from a
generator seeded by (seed, style, emoji, view), never from Python's salted ``hash()``.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from amorlip.data.emoji_art import EmojiInfo, common_emoji, stable_hash
from amorlip.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

# Varied phrasings so the text tower cannot key on one fixed template. Held-out evaluation uses another art style (docs/architecture.md).
CAPTION_TEMPLATES = (
    "an emoji of {name}",
    "a {short} icon",
    "{name}, a {subcategory} emoji",
    "a picture of {name} from the {category} category",
    "{name}",
    "the {short} emoji",
    "a drawing of {name}",
    "an icon showing {name} ({subcategory})",
    "{short}: a {category} emoji",
)
CLASSIFICATION_TEMPLATES = (
    "an emoji of {c}.",
    "a {c} emoji.",
    "an icon from the {c} category.",
    "a picture of {c}.",
    "a drawing from the {c} category.",
    "{c}.",
)
HELDOUT_SCALE = 0.85
EVAL_SHARD_SIZE = 1000
JPEG_QUALITY = 95


def _emoji_options(config: Mapping[str, Any], dataset: str) -> dict:
    ds = config["datasets"][dataset]
    if ds["source"] != "emoji":
        raise ValueError(f"dataset '{dataset}' has source '{ds['source']}', not 'emoji'")
    return ds["emoji"]


def readable_name(info: EmojiInfo) -> str:
    return info.name.lower()


def readable_short(info: EmojiInfo) -> str:
    return (info.short_names[0] if info.short_names else info.name).replace("_", " ").lower()


def readable_category(info: EmojiInfo) -> str:
    return info.category.lower()


def readable_subcategory(info: EmojiInfo) -> str:
    return info.subcategory.replace("-", " ").lower()


def caption(info: EmojiInfo, rng: np.random.Generator) -> str:
    """One caption for a training view: a random template over name, short name and categories."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(
        name=readable_name(info),
        short=readable_short(info),
        category=readable_category(info),
        subcategory=readable_subcategory(info),
    )


def _light_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # any hue, mostly pale: the art keeps its contrast while the background varies between views
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.7, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def composite(
    art: Image.Image,
    canvas: int,
    background: tuple[int, int, int],
    scale: float,
    offset: tuple[float, float] = (0.5, 0.5),
) -> Image.Image:
    """RGB ``canvas`` x ``canvas`` image: ``art`` resized to ``scale`` of the side on ``background``.

    ``offset`` places the art within the free margin (0 = left/top edge, 1 = right/bottom edge).
    """
    side = max(1, round(canvas * scale))
    resized = art.resize((side, side), Image.Resampling.LANCZOS)
    image = Image.new("RGB", (canvas, canvas), background)
    margin = canvas - side
    image.paste(resized, (round(margin * offset[0]), round(margin * offset[1])), resized)
    return image


def training_view(
    art: Image.Image, info: EmojiInfo, style: str, view: int, canvas: int, seed: int
) -> tuple[Image.Image, str]:
    """View ``view`` of one emoji in one style: random background, scale in [0.6, 1], offset, caption."""
    rng = np.random.default_rng([seed, stable_hash(f"{style}/{info.unified}/{view}")])
    background = _light_colour(rng)
    scale = float(rng.uniform(0.6, 1.0))
    offset = (float(rng.uniform()), float(rng.uniform()))
    return composite(art, canvas, background, scale, offset), caption(info, rng)


def build_demo(config: Mapping[str, Any], dataset: str, out: str | os.PathLike) -> pd.DataFrame:
    """Render the training views of ``dataset`` and write ``out`` (``urls.parquet``).

    Images go to ``<out's folder>/images/<style>/<unified>_v<k>.jpg``; the parquet's ``url`` column
    holds those paths relative to its folder (no scheme), ``caption`` the caption, and ``emoji``,
    ``name``, ``style``, ``category``, ``subcategory``, ``view`` ride along as extra columns.
    The images folder is replaced as a whole and the parquet written last, atomically.
    """
    opts = _emoji_options(config, dataset)
    train_styles = list(opts["train_styles"])
    styles = train_styles + [opts["heldout_style"]]
    # the same emoji in every style, held-out one included, so the eval measures style transfer only
    emoji, art = common_emoji(styles, opts["npm_versions"], opts["max_emoji"])
    out = Path(out)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".images-"))
    rows = []
    total = len(emoji) * len(train_styles) * opts["views_per_emoji"]
    try:
        with tqdm(total=total, desc=f"demo views ({dataset})", unit="img", mininterval=2.0) as bar:
            for style in train_styles:
                (staging / style).mkdir()
                for info in emoji:
                    for view in range(opts["views_per_emoji"]):
                        image, text = training_view(
                            art[style][info.unified], info, style, view, opts["canvas"], opts["seed"]
                        )
                        rel = f"images/{style}/{info.unified}_v{view}.jpg"
                        image.save(staging / style / f"{info.unified}_v{view}.jpg", quality=JPEG_QUALITY)
                        rows.append(
                            {
                                "url": rel,
                                "caption": text,
                                "emoji": info.unified,
                                "name": readable_name(info),
                                "style": style,
                                "category": info.category,
                                "subcategory": info.subcategory,
                                "view": view,
                            }
                        )
                        bar.update()
        images = root / "images"
        if images.exists():
            shutil.rmtree(images)
        os.rename(staging, images)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    frame = pd.DataFrame(rows)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(out, buffer.getvalue())
    log.info(
        "demo corpus %s: %d samples (%d emoji x %d styles x %d views) -> %s",
        dataset,
        len(frame),
        len(emoji),
        len(train_styles),
        opts["views_per_emoji"],
        out,
    )
    return frame


# --------------------------------------------------------------------------- held-out eval sets


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _write_shards(folder: Path, samples: list[dict]) -> int:
    """clip_benchmark's local wds layout: ``test/{0..n-1}.tar`` and ``test/nshards.txt``."""
    import webdataset as wds

    test = folder / "test"
    test.mkdir(parents=True)
    shards = max(1, -(-len(samples) // EVAL_SHARD_SIZE))
    for shard in range(shards):
        with wds.TarWriter(str(test / f"{shard}.tar")) as writer:
            for sample in samples[shard * EVAL_SHARD_SIZE : (shard + 1) * EVAL_SHARD_SIZE]:
                writer.write(sample)
    (test / "nshards.txt").write_text(f"{shards}\n")
    return shards


def _classification_task(folder: Path, emoji: list[EmojiInfo], pngs: list[bytes], label_of) -> int:
    classnames = sorted({label_of(info) for info in emoji})
    index = {name: i for i, name in enumerate(classnames)}
    samples = [
        {"__key__": f"{i:06d}_{info.unified}", "png": png, "cls": index[label_of(info)]}
        for i, (info, png) in enumerate(zip(emoji, pngs))
    ]
    _write_shards(folder, samples)
    (folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(CLASSIFICATION_TEMPLATES) + "\n")
    return len(classnames)


def retrieval_captions(info: EmojiInfo) -> list[str]:
    """The reference captions of one held-out image (any of them counts as a hit)."""
    return [f"an emoji of {readable_name(info)}", f"a {readable_short(info)} emoji"]


def _retrieval_task(folder: Path, emoji: list[EmojiInfo], pngs: list[bytes]) -> int:
    samples = [
        {"__key__": f"{i:06d}_{info.unified}", "png": png, "txt": "\n".join(retrieval_captions(info))}
        for i, (info, png) in enumerate(zip(emoji, pngs))
    ]
    _write_shards(folder, samples)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    return len(samples)


def build_heldout_evalsets(config: Mapping[str, Any], dataset: str, root: str | os.PathLike) -> dict:
    """Write the held-out-style eval sets of ``dataset`` under ``root`` and ``root/tasks.json`` last.

    One image per emoji in ``emoji.heldout_style`` (never used for training): white background,
    centred, 0.85 of the canvas. Tasks: ``emoji-category`` and ``emoji-subcategory`` (zero-shot
    classification) and ``emoji-retrieval`` (image-text retrieval). Returns the tasks.json content.
    """
    opts = _emoji_options(config, dataset)
    style = opts["heldout_style"]
    styles = list(opts["train_styles"]) + [style]
    emoji, art = common_emoji(styles, opts["npm_versions"], opts["max_emoji"])
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.json").unlink(missing_ok=True)  # the Snakemake marker must not outlive a rebuild
    pngs = [
        _png_bytes(composite(art[style][info.unified], opts["canvas"], (255, 255, 255), HELDOUT_SCALE))
        for info in tqdm(emoji, desc=f"held-out {style}", unit="img", mininterval=2.0)
    ]
    folders = {}
    for key in ("emoji-category", "emoji-subcategory", "emoji-retrieval"):
        folders[key] = root / key
        if folders[key].exists():
            shutil.rmtree(folders[key])
        folders[key].mkdir()
    n_category = _classification_task(folders["emoji-category"], emoji, pngs, readable_category)
    n_subcategory = _classification_task(folders["emoji-subcategory"], emoji, pngs, readable_subcategory)
    n_retrieval = _retrieval_task(folders["emoji-retrieval"], emoji, pngs)
    tasks = {
        "suite": "emoji-heldout",
        "style": style,
        "tasks": [
            {
                "key": "emoji-category",
                "type": "classification",
                "path": "emoji-category",
                "main_metric": "acc1",
                "group": "classification",
                "num_classes": n_category,
            },
            {
                "key": "emoji-subcategory",
                "type": "classification",
                "path": "emoji-subcategory",
                "main_metric": "acc1",
                "group": "classification",
                "num_classes": n_subcategory,
            },
            {
                "key": "emoji-retrieval",
                "type": "retrieval",
                "path": "emoji-retrieval",
                "main_metric": "mean_recall@1",
                "group": "retrieval",
                "num_samples": n_retrieval,
            },
        ],
    }
    atomic_write_json(root / "tasks.json", tasks)
    log.info(
        "held-out %s eval sets: %d images, %d categories, %d subcategories -> %s",
        style,
        len(emoji),
        n_category,
        n_subcategory,
        root,
    )
    return tasks

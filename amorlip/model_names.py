"""Which model names exist, read from the config files alone: no torch, no open_clip import.

Config validation runs while Snakemake parses the workflow and in every ``amorlip`` command; importing
open_clip there would load torch (seconds, hundreds of MB) in processes that only check a name. A
name is known when a JSON architecture config of that name exists, exactly open_clip's own rule
(``open_clip.factory._rescan_model_configs``: every ``*.json`` under its ``model_configs/`` folder that
holds ``embed_dim``, ``vision_cfg`` and ``text_cfg``), applied to open_clip's folder (found through
its installed package, never imported) and to amorlip's own tiny configs (:data:`MODEL_CONFIG_DIR`,
which :func:`amorlip.models.register_model_configs` adds to open_clip's registry).
``tests/test_models.py`` checks that this list equals ``open_clip.list_models()`` once amorlip's
configs are registered.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# what open_clip requires of a config file before it lists the name
_REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def open_clip_config_dir() -> Path:
    """open_clip's ``model_configs/`` folder, located without importing open_clip (or torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed: `pip install open_clip_torch` (see pyproject.toml)")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model_configs"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"open_clip's model_configs folder not found under {list(spec.submodule_search_locations)}")


def _names_in(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.json"):
        with open(path) as fh:
            cfg = json.load(fh)
        if all(key in cfg for key in _REQUIRED_KEYS):
            names.add(path.stem)
    return names


@functools.cache
def known_model_names() -> tuple[str, ...]:
    """Every model name ``amorlip.models.create_model`` accepts, sorted."""
    return tuple(sorted(_names_in(open_clip_config_dir()) | _names_in(MODEL_CONFIG_DIR)))

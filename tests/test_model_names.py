"""amorlip.model_names: the model names config validation accepts, known without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

from tinydata import REPO

from amorlip import model_names


def test_config_validation_imports_neither_torch_nor_open_clip():
    """``amorlip.config`` runs at Snakemake parse time: checking a run's model name must stay light."""
    code = (
        "import json, sys\n"
        "from amorlip.config import load_config, read_config_file\n"
        "for path in ('config/config.yaml', 'config/tiny.yaml'):\n"
        "    load_config(read_config_file(path))\n"
        "load_config({'runs': {'r': {'model': 'ViT-B-32'}}}, check_paths=False)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_the_names_are_open_clips_registry_plus_amorlips_configs():
    import open_clip

    from amorlip.models import register_model_configs

    register_model_configs()
    names = model_names.known_model_names()
    assert list(names) == sorted(open_clip.list_models())
    assert {"amorlip-tiny", "amorlip-demo", "RN50", "ViT-B-32"} <= set(names)


def test_a_json_without_the_architecture_keys_is_not_a_model(tmp_path, monkeypatch):
    """open_clip's rule: a config file names a model only if it holds embed_dim, vision_cfg, text_cfg."""
    (tmp_path / "whole.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
    (tmp_path / "partial.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}}))
    monkeypatch.setattr(model_names, "MODEL_CONFIG_DIR", tmp_path)
    model_names.known_model_names.cache_clear()
    try:
        names = set(model_names.known_model_names())
    finally:
        model_names.known_model_names.cache_clear()
    assert "whole" in names and "partial" not in names and "amorlip-tiny" not in names

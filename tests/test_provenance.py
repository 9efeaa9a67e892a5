"""run_provenance: the digests that pin a result, computed from the real files a run depends on."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from amorlip.config import get_run, load_config
from amorlip.provenance import FORMAT, PACKAGES, flat_provenance, run_provenance, settings_sha256

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _setup(tmp_path: Path, lr: float = 0.001) -> dict:
    url_list = tmp_path / "cc.tsv"
    url_list.write_text("a cat\thttp://example.com/1.jpg\n")
    (tmp_path / "resources" / "cc").mkdir(parents=True)
    (tmp_path / "resources" / "cc" / "urls.parquet").write_bytes(b"PAR1 stand-in bytes of the converted list")
    (tmp_path / "data" / "cc").mkdir(parents=True)
    (tmp_path / "data" / "cc" / "manifest.json").write_text(json.dumps({"samples": 1, "samples_sha256": "ab" * 32}))
    return load_config({
        "paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
        "datasets": {"cc": {"source": "url_list", "url_list": str(url_list), "column_names": ["caption", "url"]}},
        "defaults": {"dataset": "cc", "model": "amorlip-tiny"},
        "runs": {"clip": {"method": "clip", "lr": lr}, "clip-copy": {"method": "clip", "lr": lr},
                 "clip-lr": {"method": "clip", "lr": lr * 2}},
    })


def test_provenance_digests_the_files_a_run_depends_on(tmp_path):
    config = _setup(tmp_path)
    prov = run_provenance(config, get_run(config, "clip"))
    assert prov["format"] == FORMAT and prov["dataset"] == "cc"
    assert prov["url_list_sha256"] == _sha(tmp_path / "cc.tsv")
    assert prov["urls_parquet_sha256"] == _sha(tmp_path / "resources/cc/urls.parquet")
    assert prov["manifest_sha256"] == _sha(tmp_path / "data/cc/manifest.json")
    assert prov["samples_sha256"] == "ab" * 32
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit and a dirty flag
        assert prov["code"]["git_commit"] == head.stdout.strip() and isinstance(prov["code"]["git_dirty"], bool)
    import numpy
    import torch

    assert set(prov["packages"]) == set(PACKAGES)
    assert torch.__version__.startswith(prov["packages"]["torch"]) and prov["packages"]["numpy"] == numpy.__version__
    json.dumps(prov)  # train.json and MLflow take it as it is
    flat = flat_provenance(prov)
    assert flat["provenance.manifest_sha256"] == prov["manifest_sha256"]
    assert flat["provenance.packages.torch"] == prov["packages"]["torch"]
    assert all(isinstance(v, str) for v in flat.values())


def test_provenance_changes_with_the_data_and_the_settings_only(tmp_path):
    config = _setup(tmp_path)
    clip, copy, faster = (get_run(config, n) for n in ("clip", "clip-copy", "clip-lr"))
    # the run's name is not a setting; its lr is
    assert settings_sha256(clip) == settings_sha256(copy) != settings_sha256(faster)
    before = run_provenance(config, clip)
    manifest = tmp_path / "data/cc/manifest.json"
    manifest.write_text(json.dumps({"samples": 1, "samples_sha256": "cd" * 32}))  # another download
    after = run_provenance(config, clip)
    assert after["manifest_sha256"] != before["manifest_sha256"] and after["samples_sha256"] == "cd" * 32
    assert {k: v for k, v in after.items() if "sha256" not in k} == {k: v for k, v in before.items() if "sha256" not in k}


def test_missing_files_give_none_not_an_error(tmp_path):
    config = _setup(tmp_path)
    (tmp_path / "data/cc/manifest.json").unlink()
    (tmp_path / "resources/cc/urls.parquet").unlink()
    prov = run_provenance(config, get_run(config, "clip"))
    assert prov["manifest_sha256"] is None and prov["samples_sha256"] is None
    assert prov["urls_parquet_sha256"] is None and prov["url_list_sha256"] == _sha(tmp_path / "cc.tsv")
    assert flat_provenance(prov)["provenance.manifest_sha256"] == ""

"""A fan-out download (datasets.<name>.parts: 3) through `--profile profiles/slurm` on the local cluster.

The data stage of a small url list (relative paths, served by each download's own loopback server
through the real img2dataset): one split job, three download_part jobs (each its own SLURM job),
one merge and one index, ending in one dense shard set whose manifest accounts for every url per part.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from slurm_helpers import jobs_named, run_snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

N_GOOD, PER_SHARD, PARTS = 14, 3, 3


def _write_list(root: Path) -> None:
    images = root / "resources" / "small" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["url\tcaption"]
    for i in range(N_GOOD):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (images / f"{i}.jpg").write_bytes(buf.getvalue())
        lines.append(f"images/{i}.jpg\tpicture {i}")
    lines.append("images/missing.jpg\tgone")  # a 404
    (root / "resources" / "small" / "list.tsv").write_text("\n".join(lines) + "\n")


@pytest.mark.timeout(1200)
def test_fanout_download_runs_one_slurm_job_per_part(tmp_path: Path, slurm_cluster) -> None:
    _write_list(tmp_path)
    config = {"datasets": {"small": {"source": "url_list", "url_list": "resources/small/list.tsv",
                                     "image_size": 32, "samples_per_shard": PER_SHARD, "processes": 1,
                                     "threads": 4, "timeout": 5, "parts": PARTS}},
              "runs": {"clip": {"method": "clip", "dataset": "small", "model": "amorlip-tiny"}},
              "evaluation": {"suites": ["datacomp"], "download": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code, sm = run_snakemake(tmp_path, "data", configfile=tmp_path / "config.yaml", timeout=1000)
    assert code == 0, sm.tail()
    by_rule: dict[str, int] = {}
    for job in jobs_named(sm.prefix):
        rule = job["comment"].split("_wildcards")[0]
        by_rule[rule] = by_rule.get(rule, 0) + 1
        assert job["state"] == "COMPLETED", job
    assert by_rule == {"rule_source": 1, "rule_split_urls": 1, "rule_download_part": PARTS,
                       "rule_merge_parts": 1, "rule_index": 1}, by_rule

    data = tmp_path / "data" / "small"
    sizes = json.loads((data / "sizes.json").read_text())
    assert sorted(sizes) == [f"{i:05d}.tar" for i in range(5)]  # 15 urls, 3 per shard: dense across parts
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["samples"] == sum(sizes.values()) == N_GOOD
    assert manifest["failures"] == {"http_404": 1} and manifest["urls"] == N_GOOD + 1
    assert [p["part"] for p in manifest["parts"]] == ["000", "001", "002"]
    assert sum(p["urls"] for p in manifest["parts"]) == N_GOOD + 1
    assert sum(p["successes"] for p in manifest["parts"]) == N_GOOD

"""Security: what a file, a url list or a config value can make the pipeline do.

- Checkpoints and ``model.pt`` load with ``torch.load(weights_only=True)``: loading them cannot run
  pickled code. (DeepSpeed's ZeRO optimizer files are the exception: DeepSpeed loads them itself
  with ``weights_only=False``; resume only from checkpoints you wrote.)
- Servers bind the loopback interface: the loopback file server, and the trainer's process group
  (a single process uses an in-memory store; torch's TCPStore would listen on every interface).
  The MLflow server side is checked in test_tracking_outage.py, where one runs.
- Config strings that reach a shell are quoted: the real Snakemake DAG (``data`` target: source ->
  img2dataset download -> index) runs with ``paths`` values holding spaces, ``;``, ``$(...)`` and
  backticks, and nothing they spell is executed. (Run names cannot hold such characters at all:
  see test_bad_configs.py, case ``unsafe_run_name``.)
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import urllib.request

import numpy as np
import pandas as pd
import psutil
import torch
import yaml
from PIL import Image

from amorlip.cli import main as cli_main
from amorlip.data.loopback import LoopbackFileServer
from amorlip.train import checkpoint as ckpt
from amorlip.train.export import client_state

from .conftest import BIN, REPO, child_env, run_dir


def _listening(pid: int) -> list[str]:
    return sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(pid).net_connections("inet")
                   if c.status == psutil.CONN_LISTEN})


def _loopback_only(addresses: list[str]) -> bool:
    return all(a.rsplit(":", 1)[0] in ("127.0.0.1", "::1") for a in addresses)


def test_checkpoints_and_model_pt_load_with_weights_only(reference_run):
    reference_run = reference_run.get()
    root = reference_run["root"]
    ckpt_dir = run_dir(root) / "checkpoints"
    tags = ckpt.complete_tags(ckpt_dir)
    assert tags
    for tag in tags:
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        assert {"position", "task", "run", "module"} <= set(states)  # DeepSpeed's and our client state
        rng = torch.load(ckpt_dir / tag / "rng-rank0.pt", map_location="cpu", weights_only=True)
        assert {"torch", "numpy", "python"} <= set(rng)
    assert client_state(ckpt_dir, tags[-1])["position"]["steps_done"] == reference_run["summary"]["steps"]
    # export through the real CLI entry point, then load the result the safe way
    assert cli_main(["export", "--config", str(reference_run["config"]), "--run", "tiny-run"]) == 0
    model = torch.load(run_dir(root) / "model.pt", map_location="cpu", weights_only=True)
    assert model["format"] == "amorlip-model/1" and model["state_dict"]
    print(f"\nweights_only=True loads: {len(tags)} checkpoints (model states + client state, RNG) and model.pt")


def test_loopback_file_server_listens_on_127_0_0_1_only(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path.parent / "outside.txt").write_text("secret")
    with LoopbackFileServer(tmp_path) as server:
        mine = [a for a in _listening(psutil.Process().pid) if a.endswith(f":{server.port}")]
        assert mine == [f"127.0.0.1:{server.port}"], mine
        # not reachable through any other address of this machine
        others = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        for ip in others - {"127.0.0.1"}:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, server.port)) != 0, f"reachable on {ip}"
        with urllib.request.urlopen(server.url_for("a.txt"), timeout=5) as r:
            assert r.read() == b"hello"
        try:
            urllib.request.urlopen(f"{server.base_url}/../outside.txt", timeout=5)
            raise AssertionError("served a file outside its root")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    print(f"\nloopback file server listened on {mine} only")


def test_snakemake_dag_quotes_paths_with_spaces_and_semicolons(tmp_path):
    """The `data` target with hostile `paths`: it works, and no injected command runs."""
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    hostile = {
        "data": "d a;touch PWNED_data;echo pwned",
        "resources": "r e$(touch PWNED_subshell)",
        "results": "res `touch PWNED_backtick`",
        "runs": "runs & touch PWNED_runs",
    }
    resources = workdir / hostile["resources"] / "q"
    (resources / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (resources / "images" / f"{i}.jpg").write_bytes(buf.getvalue())
        rows.append({"url": f"images/{i}.jpg", "caption": f"picture {i}; rm -rf ~"})
    url_list = workdir / "lists; touch PWNED_list" / "urls.tsv"
    url_list.parent.mkdir()
    pd.DataFrame(rows).to_csv(url_list, sep="\t", index=False)
    config = {
        "name": "quoting",
        "paths": hostile,
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "datasets": {"q": {"source": "url_list", "url_list": str(url_list), "image_size": 24,
                           "samples_per_shard": 4, "processes": 1, "threads": 2}},
        "defaults": {"dataset": "q", "model": "amorlip-tiny"},
        "runs": {"clip": {"method": "clip"}},
        "evaluation": {"suites": ["datacomp"]},  # emoji-heldout needs an emoji dataset in the config
    }
    cfg = tmp_path / "config; touch PWNED_cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    res = subprocess.run([str(BIN / "snakemake"), "data", "--cores", "2", "-s", str(REPO / "Snakefile"),
                          "-d", str(workdir), "--configfile", str(cfg)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    manifest = json.loads((workdir / hostile["data"] / "q" / "manifest.json").read_text())
    assert manifest["samples"] == 6 and manifest["failed"] == 0, manifest
    pwned = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("PWNED*") if p.is_file())
    pwned += [str(p) for p in (REPO.glob("PWNED*"))]
    assert pwned == [], f"an injected command ran: {pwned}"
    print(f"\nsnakemake data with paths {list(hostile.values())}: {manifest['samples']} samples indexed, "
          "no injected command ran")

"""Smoke tests of the benchmarks (benchmarks/): every module runs end to end in its tiny mode and
writes its JSON. No timing is asserted here: speed goals live in the benchmarks themselves
(benchmarks/RESULTS.md), never in unit tests.

The run_all test starts five Python processes (three benchmarks, our trainer, open_clip_train), about
a minute of imports and start-ups on 2 idle cores, so it is marked ``slow`` (``make test`` runs it,
``make test-fast`` does not); the GPU-script and quality-summary tests run in-process in seconds."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", DS_BUILD_OPS="0",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_run_all_tiny_runs_every_cpu_benchmark_and_reports_each_ratio(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--tiny", "--out-dir", str(out),
                           "--workdir", str(work)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("step_time", "vs_open_clip", "data_throughput", "collectives", "summary"):
        data = json.loads((out / f"{name}_tiny.json").read_text())
        assert data["tiny"] is True and data["machine"]["cpu"]
    step = json.loads((out / "step_time_tiny.json").read_text())
    assert set(step["contenders"]) == {"clip", "amorlip-t1", "amorlip-t8"}
    assert all(c["flops_per_step"] > 0 for c in step["contenders"].values())
    data = json.loads((out / "data_throughput_tiny.json").read_text())
    assert data["download"]["summaries"][0]["successes"] == data["download"]["images"]
    assert data["ratio"] is not None  # read from step_time's JSON, which ran first
    for ratio in ("AmorLIP(T_online=8) / CLIP", "ours / open_clip_train", "loader images/s / CLIP step",
                  "wire bytes/step AmorLIP local / global, cc3m-rn50, 64 GPUs"):
        assert ratio in proc.stdout
    # collectives: counted bytes equal the arithmetic at 2 ranks; local negatives gather the least
    co = json.loads((out / "collectives_tiny.json").read_text())
    assert co["formula_checks"] and all(c["agrees"] for c in co["formula_checks"])
    two = co["worlds"]["2"]
    assert two["amorlip-local"]["feature_payload"] < two["clip"]["feature_payload"] < two["amorlip-global"]["feature_payload"]
    assert {(r["config"], r["contender"]) for r in co["projection"]} == {
        (c, n) for c in ("config/cc3m-rn50.yaml", "config/cc12m-vitb32.yaml")
        for n in ("clip", "amorlip-global", "amorlip-local")}


@pytest.mark.slow
def test_download_scale_tiny_accounts_every_url(tmp_path):
    """The fan-out benchmark end to end, in its killed-and-resumed run (N = 2 parts of 80 urls, one part
    stopped after its first shard and started again), which takes every step of an uninterrupted run."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.download_scale", "--tiny", "--kill-only", "--out-dir",
                           str(tmp_path), "--workdir", str(tmp_path / "work")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "download_scale_tiny.json").read_text())
    assert data["tiny"] is True and not data["partial"]
    assert [r["parts"] for r in data["results"]] == [2]
    for r in data["results"]:
        assert r["urls"] == 80 and r["rows"] == 80 and r["mismatches"] == 0 and r["duplicates"] == 0, r
    killed = data["results"][0]["killed"]
    assert killed["exit_status"] != 0 and killed["shards_finished_before_kill"] >= 1  # stopped mid-way, resumed


def test_gpu_step_tiny_runs_on_cpu(tmp_path):
    from benchmarks import gpu_step

    payload = gpu_step.main(["--tiny", "--out-dir", str(tmp_path)])
    res = payload["results"]["8"]
    assert set(res) == {"clip", "amorlip-t1", "amorlip-t8", "open_clip"}
    assert json.loads((tmp_path / "gpu_tiny.json").read_text())["model"] == "amorlip-tiny"


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
])
def test_gpu_step_datasheet_peak_lookup(name, key):
    from benchmarks import gpu_step

    assert gpu_step.datasheet_peak(name) == (key, gpu_step.DATASHEET_BF16_DENSE_TFLOPS[key])


def test_gpu_step_datasheet_peaks_and_mfu_arithmetic():
    from benchmarks import gpu_step

    table = gpu_step.DATASHEET_BF16_DENSE_TFLOPS
    assert (table["H100 SXM"], table["H100 PCIe"], table["H200"], table["A100"]) == (989.4, 756.0, 989.4, 312.0)
    assert gpu_step.datasheet_peak("NVIDIA GeForce RTX 4090") is None
    assert gpu_step.datasheet_peak("Tesla V100-SXM2-16GB") is None
    # 3.957 TFLOP per step in 10 ms = 395.7 TFLOP/s: 40 % of an H100 SXM's 989.4
    assert gpu_step.mfu(3.9576e12, 0.010, 989.4) == pytest.approx(0.40)
    assert gpu_step.mfu(1e12, 0.01, None) is None


def test_gpu_step_autocasts_the_towers_only():
    """The benchmark's bf16 scope is training's: tower layers in bf16, lambda nets and loss in fp32."""
    import torch

    from amorlip.models import create_model, model_config
    from amorlip.tasks import build_task
    from benchmarks import gpu_step

    torch.manual_seed(0)
    model, _, _ = create_model("amorlip-tiny", init_logit_scale=1 / 0.07)
    cfg = model_config("amorlip-tiny")
    task = build_task(gpu_step.run_config("amorlip", 8, 1), model, cfg["embed_dim"], "cpu")
    task.model = gpu_step.AutocastTowers(model, "cpu", torch.bfloat16)
    task.start_epoch(1, 100)
    tower_modules = set(model.modules())
    seen: dict[bool, set] = {True: set(), False: set()}

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen[module in tower_modules].add(output.dtype)

    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(8, 3, size, size)
    texts = torch.randint(1, cfg["text_cfg"]["vocab_size"], (8, cfg["text_cfg"]["context_length"]))
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        out = task.training_forward(images, texts, 0)
    finally:
        handle.remove()
    assert seen[True] == {torch.bfloat16}, seen      # the towers
    assert seen[False] == {torch.float32}, seen      # the lambda nets
    assert out["loss"].dtype == torch.float32


def _suite_result(run: str, mean_main: float) -> dict:
    return {"run": run, "suite": "emoji-heldout", "tasks": {"category": {"main": 2 * mean_main},
                                                            "retrieval": {"main": 0.0}},
            "aggregates": {"mean_main": mean_main, "chance_mean_main": 0.01, "covered": 3, "total": 3}}


@pytest.mark.parametrize("missing", [False, True])
def test_quality_summary_groups_seeds_by_method_and_batch(tmp_path, missing):
    from amorlip.diagnostics import flat_figures
    from benchmarks import quality_summary

    # the suite's fractions; the summary reports percentages
    values = {"clip-b32-s0": 0.10, "clip-b32-s1": 0.12, "amorlip-published-b32-s0": 0.15,
              "amorlip-published-b32-s1": 0.11}
    if missing:
        values.pop("amorlip-published-b32-s1")
    for run, v in values.items():
        path = tmp_path / "results" / run / "emoji-heldout.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_suite_result(run, v)))
    for seed, (first, last, cosine) in enumerate(((0.9, 0.25, 0.5), (0.8, 0.35, 0.7))):
        lines = [{"step": 1, "epoch": 0, "loss": 1.0}]
        for epoch, rmse in enumerate((first, last)):
            report = {"modalities": {m: {"target": {"std": 0.3}, "predictors": {
                          "ema": {"rmse": rmse, "bias": 0.0, "corr": 0.5},
                          "in_batch": {"rmse": 0.4, "bias": 0.0, "corr": 0.9}}} for m in ("image", "text")},
                      "gradient_fidelity": {"cosine": cosine}}
            lines.append({"step": 12 * (epoch + 1), "epoch": epoch, "kind": "amortization", **flat_figures(report)})
        path = tmp_path / "runs" / f"amorlip-published-b32-s{seed}" / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = tmp_path / "config.yaml"
    config.write_text("paths: {data: data, runs: runs, results: results, resources: resources}\n"
                      "runs: {}\nsweep: {method: [clip, amorlip], batch_size: [32], seed: [0, 1]}\n")
    payload = quality_summary.main(["--config", str(config), "--workdir", str(tmp_path),
                                    "--out-dir", str(tmp_path / "out")])
    clip = payload["cells"]["clip"]["32"]
    amor = payload["cells"]["amorlip-published"]["32"]
    assert clip["mean"] == pytest.approx(11.0) and clip["n"] == 2
    assert amor["n"] == (1 if missing else 2)
    assert amor["minus_clip"] == pytest.approx((15.0 if missing else 13.0) - 11.0)
    assert amor["relative_to_clip"] == pytest.approx((15.0 if missing else 13.0) / 11.0 - 1.0)
    # same-seed pairs only: seed 0 won by 5 points, seed 1 (when present) lost by 1
    paired = amor["paired"]
    assert paired["diffs"] == pytest.approx([5.0] if missing else [5.0, -1.0])
    assert (paired["wins"], paired["n"]) == ((1, 1) if missing else (1, 2))
    pooled = payload["pooled_vs_clip"]["amorlip-published"]
    assert pooled["mean_diff"] == pytest.approx(5.0 if missing else 2.0)
    assert clip["tasks"] == pytest.approx({"category": 22.0, "retrieval": 0.0})
    assert payload["missing"] == (["amorlip-published-b32-s1"] if missing else [])
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    # amortization: each AmorLIP run's last epoch-end record of metrics.jsonl, in the trainer's format
    assert clip["amortization"] is None
    assert amor["amortization"]["n"] == 2 and amor["amortization"]["epoch"] == 1
    assert amor["amortization"]["image_ema_rmse"] == pytest.approx((0.25 + 0.35) / 2)  # epoch 1's, not 0's
    assert amor["amortization"]["grad_cosine"] == pytest.approx((0.5 + 0.7) / 2)
    assert amor["amortization"]["text_in_batch_rmse"] == pytest.approx(0.4)


def test_quality_summary_degradation_pairs_seeds_and_gives_t_intervals(tmp_path):
    """Degradation = metric(small) - metric(large) per seed, minus CLIP's on the same seed, with a 95 % t CI."""
    from scipy.stats import t

    from benchmarks import quality_summary

    clip = {(32, 0): 0.10, (128, 0): 0.12, (32, 1): 0.11, (128, 1): 0.12, (32, 2): 0.09, (128, 2): 0.12}
    fast = {(32, 0): 0.13, (128, 0): 0.13, (32, 1): 0.12, (128, 1): 0.12, (32, 2): 0.13, (128, 2): 0.12}
    for method, values in (("clip", clip), ("fastclip-v3", fast)):
        for (batch, seed), v in values.items():
            run = f"{method}-b{batch}-s{seed}"
            path = tmp_path / "results" / run / "emoji-heldout.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(_suite_result(run, v)))
    config = tmp_path / "config.yaml"
    config.write_text("paths: {data: data, runs: runs, results: results, resources: resources}\n"
                      "runs: {}\nsweep: {method: [clip, fastclip], variant: [v3], batch_size: [32, 128], "
                      "seed: [0, 1, 2]}\n")
    payload = quality_summary.main(["--config", str(config), "--workdir", str(tmp_path),
                                    "--out-dir", str(tmp_path / "out")])
    deg = payload["degradation"]
    clip_drop = [-2.0, -1.0, -3.0]          # points: b32 - b128 per seed
    fast_drop = [0.0, 0.0, 1.0]
    assert deg["clip"]["drop"]["mean"] == pytest.approx(-2.0)
    vs = deg["fastclip-v3"]["vs_clip"]
    diffs = [f - c for f, c in zip(fast_drop, clip_drop)]   # 2, 1, 4
    half = t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert vs["n"] == 3 and vs["mean"] == pytest.approx(7.0 / 3)
    assert (vs["ci_low"], vs["ci_high"]) == pytest.approx((7.0 / 3 - half, 7.0 / 3 + half))
    assert quality_summary.verdict(vs) == "not separable"  # 3 pairs: the CI [-1.5, +6.1] holds 0
    assert quality_summary.verdict(quality_summary.ci95([2.0, 2.1, 1.9])) == "above"
    assert quality_summary.verdict(quality_summary.ci95([-1.0, -1.2, -0.8])) == "below"
    assert quality_summary.verdict(quality_summary.ci95([1.0])) == "n < 2"
    # per-batch pairs carry the same interval arithmetic
    paired = payload["cells"]["fastclip-v3"]["32"]["paired"]
    assert paired["diffs"] == pytest.approx([3.0, 1.0, 4.0]) and paired["ci_low"] < paired["mean"] < paired["ci_high"]
    mde = payload["detectable"]["degradation minus CLIP's"]
    assert mde["n"] == 3
    assert mde["mde"] == pytest.approx((t.ppf(0.975, 2) + t.ppf(0.8, 2)) * statistics.stdev(diffs) / math.sqrt(3))


def test_quality_targets_list_each_seeds_result_files(tmp_path):
    """make bench-quality asks Snakemake for one seed's evaluations at a time: every method and batch of it."""
    from amorlip.config import load_config
    from benchmarks.quality_targets import targets_by_seed

    config = load_config({"paths": {k: str(tmp_path / k) for k in ("data", "runs", "results", "resources")},
                          "datasets": {"d": {"source": "emoji"}}, "defaults": {"dataset": "d"}, "runs": {},
                          "sweep": {"method": ["clip", "fastclip"], "variant": ["v3"], "batch_size": [32, 128],
                                    "seed": [2, 0]}, "evaluation": {"suites": ["emoji-heldout"]}},
                         check_paths=False)
    by_seed = targets_by_seed(config)
    assert list(by_seed) == [0, 2]
    assert sorted(Path(p).parent.name for p in by_seed[2]) == [
        "clip-b128-s2", "clip-b32-s2", "fastclip-v3-b128-s2", "fastclip-v3-b32-s2"]
    assert all(p.startswith(str(tmp_path / "results")) and p.endswith("/emoji-heldout.json") for p in by_seed[0])

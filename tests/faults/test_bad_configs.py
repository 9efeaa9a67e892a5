"""Bad configs stop before any job, through both doors a user has: ``snakemake -n`` and ``amorlip validate``.

Each case is one class of mistake (the schema's violation kinds, then the semantic checks the schema
cannot express). The assertion is on what the user reads: the dotted key and a hint of the fix, on
the real Snakefile (which merges the file over config/config.yaml, as a user's --configfile is) and
on the CLI. "Before any job" is checked, not assumed: Snakemake's workdir stays empty (not even the
resolved config is written) and no job line is printed.

Snakemake runs are grouped and started together, and ``amorlip validate`` runs through the real CLI
entry point in this process, so the module costs a few seconds of CPU, not one process per case.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from amorlip.cli import main as cli_main

from .conftest import BIN, REPO, child_env

# name -> (config overlay, substrings the error must contain: the key, then the fix / allowed values)
CASES: dict[str, tuple[dict | str, list[str]]] = {
    "unknown_top_level_key": ({"epochs": 3}, ["unknown key 'epochs'", "allowed:", "defaults"]),
    "unknown_nested_key": ({"defaults": {"amorlip": {"lamda_lr": 0.01}}},
                           ["'defaults.amorlip.lamda_lr'", "allowed:", "lambda_lr"]),
    "unknown_key_in_a_run": ({"runs": {"clip": {"batchsize": 32}}},
                             ["'runs.clip.batchsize'", "allowed:", "batch_size"]),
    "unknown_dataset_key": ({"datasets": {"emoji-demo": {"source": "emoji", "shard_size": 10}}},
                            ["'datasets.emoji-demo.shard_size'", "samples_per_shard"]),
    "wrong_type": ({"defaults": {"epochs": "four"}}, ["'defaults.epochs'", "not of type 'integer'"]),
    "out_of_range": ({"defaults": {"lr": -0.1}}, ["'defaults.lr'", "minimum of 0"]),
    "out_of_range_in_a_run": ({"runs": {"amorlip": {"amorlip": {"ema_alpha": 1.5}}}},
                              ["'runs.amorlip.amorlip.ema_alpha'", "maximum of 1"]),
    "bad_enum": ({"defaults": {"method": "clap"}}, ["'defaults.method'", "'clip', 'siglip', 'amorlip'"]),
    # `adam_eps: 1e-6` as a user types it: YAML 1.1 (PyYAML, Snakemake) reads it as the text '1e-6'
    "number_yaml_reads_as_text": ("defaults:\n  adam_eps: 1e-6\n",
                                  ["'defaults.adam_eps'", "YAML reads 1e-6 as text", "1.0e-4"]),
    "missing_required": ({"datasets": {"cc3m": {"url_list": "cc3m.tsv"}}},
                         ["'datasets.cc3m'", "'source' is a required property"]),
    "unknown_model": ({"defaults": {"model": "ViT-Q-99"}},
                      [".model'", "unknown model 'ViT-Q-99'", "open_clip name"]),
    "batch_not_divisible_by_ranks": ({"defaults": {"batch_size": 30, "nproc": 4}},
                                     [".batch_size'", "not divisible", "multiple of 4"]),
    "missing_dataset_path": ({"datasets": {"cc3m": {"source": "url_list", "url_list": "/nonexistent/cc3m.tsv"}},
                              "defaults": {"dataset": "cc3m"}},
                             ["'datasets.cc3m.url_list'", "file not found", "/nonexistent/cc3m.tsv"]),
    "unknown_dataset_in_a_run": ({"runs": {"clip": {"dataset": "laion"}}},
                                 ["'runs.clip.dataset'", "unknown dataset 'laion'", "emoji-demo"]),
    "unsafe_run_name": ({"runs": {"a;rm -rf x": {"method": "clip"}}}, ["invalid run name", "letters, digits"]),
}


# The schema reports up to five violations at once, so Snakemake checks the schema classes in two
# combined configs; each semantic check stops at the first failure and gets its own config.
SNAKEMAKE_GROUPS = {
    "schema-a": ["unknown_top_level_key", "unknown_nested_key", "unknown_key_in_a_run", "wrong_type",
                 "bad_enum"],
    "schema-b": ["unknown_dataset_key", "out_of_range", "out_of_range_in_a_run", "missing_required",
                 "number_yaml_reads_as_text"],
    **{case: [case] for case in ("unknown_model", "batch_not_divisible_by_ranks", "missing_dataset_path",
                                 "unknown_dataset_in_a_run", "unsafe_run_name")},
}


@pytest.fixture(scope="module")
def snakemake_outcomes(tmp_path_factory) -> dict[str, dict]:
    """`snakemake -n` on the real Snakefile for every group, started together: case -> rc, output, workdir."""
    root = tmp_path_factory.mktemp("bad-configs")
    procs = {}
    t0 = time.monotonic()
    for group, cases in SNAKEMAKE_GROUPS.items():
        overlay: dict = {}
        for case in cases:
            overlay = _merge(overlay, _overlay(case))
        cfg = root / f"{group}.yaml"
        cfg.write_text(yaml.safe_dump(overlay))
        workdir = root / f"{group}-workdir"
        workdir.mkdir()
        procs[group] = (subprocess.Popen(
            [str(BIN / "snakemake"), "-n", "--cores", "1", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
             "--configfile", str(cfg)],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), workdir)
    out = {}
    for group, (proc, workdir) in procs.items():
        text, _ = proc.communicate(timeout=240)
        for case in SNAKEMAKE_GROUPS[group]:
            out[case] = {"rc": proc.returncode, "out": text, "workdir": workdir}
    print(f"\n{len(procs)} snakemake -n runs over {len(CASES)} bad configs in {time.monotonic() - t0:.1f} s")
    return out


def _overlay(case: str) -> dict:
    """A case's config as the loader sees it (raw YAML text goes through PyYAML, as a user's file does)."""
    overlay = CASES[case][0]
    return yaml.safe_load(overlay) if isinstance(overlay, str) else overlay


def _merge(base: dict, over: dict) -> dict:
    """Snakemake's config merge (snakemake.utils.update_config): nested dicts merge, the rest replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_stops_before_any_job_naming_the_key(snakemake_outcomes, case, tmp_path, capsys):
    expected = CASES[case][1]
    # Snakemake: a WorkflowError with our message, no job planned, nothing written in the workdir
    res = snakemake_outcomes[case]
    assert res["rc"] != 0, res["out"][-2000:]
    for text in expected:
        assert text in res["out"], f"snakemake -n output lacks {text!r}:\n{res['out'][-2000:]}"
    assert "config error" in res["out"]
    assert "Job stats" not in res["out"] and "rule " not in res["out"]
    written = [p for p in Path(res["workdir"]).rglob("*") if ".snakemake" not in p.parts]
    assert written == [], f"files written before the config was rejected: {written}"
    # amorlip validate (the real CLI entry point, in this process): exit 2, one line, no traceback.
    # It reads the same merge Snakemake makes: config/config.yaml, then the user's file.
    merged = _merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), _overlay(case))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merged))
    rc = cli_main(["validate", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("amorlip: config error") and "Traceback" not in err and "\n" not in err
    for text in expected:
        assert text in err, f"amorlip validate message lacks {text!r}: {err}"
    print(f"{case}: {err[:200]}")


def test_the_untouched_demo_config_is_valid(capsys):
    """The cases above fail because of their one mistake, not because the base config is broken."""
    assert cli_main(["validate", "--config", str(REPO / "config" / "config.yaml")]) == 0
    assert "config OK" in capsys.readouterr().out

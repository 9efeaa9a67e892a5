"""Bad configs stop before any job, through both doors a user has: ``snakemake -n`` and ``amorlip validate``.

Each case is one class of mistake (the schema's violation kinds, then the semantic checks the schema
cannot express). The assertion is on what the user reads: the dotted key and a hint of the fix, on
the real Snakefile (which merges the file over config/config.yaml, as a user's --configfile is) and
on the CLI. "Before any job" is checked, not assumed: Snakemake's workdir stays empty (not even the
resolved config is written) and no job line is printed.

All cases' processes start together (they are independent and mostly wait on imports), so the
module costs about one Snakemake start rather than eleven.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, PY, REPO, child_env

# name -> (config overlay, substrings the error must contain: the key, then the fix / allowed values)
CASES: dict[str, tuple[dict, list[str]]] = {
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
    "missing_required": ({"datasets": {"cc3m": {"url_list": "cc3m.tsv"}}},
                         ["'datasets.cc3m'", "'source' is a required property"]),
    "unknown_model": ({"defaults": {"model": "ViT-Q-99"}},
                      ["'runs.clip.model'", "unknown model 'ViT-Q-99'", "open_clip name"]),
    "batch_not_divisible_by_ranks": ({"defaults": {"batch_size": 30, "nproc": 4}},
                                     ["'runs.clip.batch_size'", "not divisible", "multiple of 4"]),
    "missing_dataset_path": ({"datasets": {"cc3m": {"source": "url_list", "url_list": "/nonexistent/cc3m.tsv"}},
                              "defaults": {"dataset": "cc3m"}},
                             ["'datasets.cc3m.url_list'", "file not found", "/nonexistent/cc3m.tsv"]),
    "unknown_dataset_in_a_run": ({"runs": {"clip": {"dataset": "laion"}}},
                                 ["'runs.clip.dataset'", "unknown dataset 'laion'", "emoji-demo"]),
    "unsafe_run_name": ({"runs": {"a;rm -rf x": {"method": "clip"}}}, ["invalid run name", "letters, digits"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    """Start `snakemake -n` and `amorlip validate` for every case at once; collect rc, stderr, workdir."""
    root = tmp_path_factory.mktemp("bad-configs")
    procs = {}
    t0 = time.monotonic()
    for name, (overlay, _) in CASES.items():
        cfg = root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(overlay))
        workdir = root / f"{name}-workdir"
        workdir.mkdir()
        snake = subprocess.Popen([str(BIN / "snakemake"), "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                                  "-d", str(workdir), "--configfile", str(cfg)],
                                 cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        # validate sees the same merge Snakemake makes (config/config.yaml, then the user's file)
        merged = _merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), overlay)
        merged_path = root / f"{name}.merged.yaml"
        merged_path.write_text(yaml.safe_dump(merged))
        validate = subprocess.Popen([PY, "-m", "amorlip.cli", "validate", "--config", str(merged_path)],
                                    cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        procs[name] = (snake, validate, workdir)
    out = {}
    for name, (snake, validate, workdir) in procs.items():
        s_out, _ = snake.communicate(timeout=240)
        v_out, v_err = validate.communicate(timeout=240)
        out[name] = {"snake_rc": snake.returncode, "snake_out": s_out, "validate_rc": validate.returncode,
                     "validate_out": v_out, "validate_err": v_err, "workdir": workdir}
    print(f"\n{len(CASES)} bad configs x (snakemake -n, amorlip validate) in {time.monotonic() - t0:.1f} s")
    return out


def _merge(base: dict, over: dict) -> dict:
    """Snakemake's config merge (snakemake.utils.update_config): nested dicts merge, the rest replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_stops_before_any_job_naming_the_key(outcomes, case):
    res = outcomes[case]
    expected = CASES[case][1]
    # Snakemake: a WorkflowError with our message, no job planned, nothing written in the workdir
    assert res["snake_rc"] != 0, res["snake_out"][-2000:]
    for text in expected:
        assert text in res["snake_out"], f"snakemake -n output lacks {text!r}:\n{res['snake_out'][-2000:]}"
    assert "config error" in res["snake_out"]
    assert "Job stats" not in res["snake_out"] and "rule " not in res["snake_out"]
    written = [p for p in Path(res["workdir"]).rglob("*") if ".snakemake" not in p.parts]
    assert written == [], f"files written before the config was rejected: {written}"
    # amorlip validate: exit 2, one line on stderr, no traceback
    assert res["validate_rc"] == 2, res["validate_err"][-2000:]
    line = res["validate_err"].strip()
    assert line.startswith("amorlip: config error") and "Traceback" not in line
    for text in expected:
        assert text in line, f"amorlip validate message lacks {text!r}: {line}"
    print(f"{case}: {line[:160]}")


def test_the_untouched_demo_config_is_valid():
    """The cases above fail because of their one mistake, not because the base config is broken."""
    res = subprocess.run([PY, "-m", "amorlip.cli", "validate", "--config", str(REPO / "config" / "config.yaml")],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "config OK" in res.stdout

"""Config files a careless or hostile user writes: both doors (``snakemake -n``, ``amorlip validate``)
refuse them, naming the key, the line or the limit.

test_bad_configs.py covers what a parsed config can get wrong; these cases live in the file itself
(a key given twice, an alias bomb, an empty file) or in values no schema bound catches (NaN, a name
that escapes its folder, a seed beyond 64 bits). Each case is a raw YAML text written as the user
wrote it, so nothing is lost to a re-serialisation on the way. Snakemake processes start together.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from amorlip.cli import main as cli_main
from amorlip.config import MAX_CONFIG_NODES, ConfigError, load_config

from .conftest import BIN, REPO, child_env


def _alias_bomb(levels: int) -> str:
    """~70 bytes per level; level n expands to 10^(n+1) numbers under a key that takes a list."""
    rows = ["      - &l0 [" + ", ".join(["1.0"] * 10) + "]"]
    rows += [f"      - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "defaults:\n  amorlip:\n    rho:\n" + "\n".join(rows) + "\n"


# name -> (file text, substrings of the error, the same through snakemake -n)
CASES: dict[str, tuple[str, list[str]]] = {
    # the second `clip` would silently replace the first: a run called clip training SigLIP
    "duplicate_run": ("runs:\n  clip: {method: clip}\n  amorlip: {method: amorlip}\n  clip: {method: siglip}\n",
                      ["duplicate key 'runs.clip'", "line 4", "first given at line 2"]),
    "duplicate_nested_key": ("defaults:\n  lr: 0.001\n  epochs: 2\n  lr: 0.1\n",
                             ["duplicate key 'defaults.lr'", "line 4", "line 2"]),
    # 560 bytes that the old loader expanded to 10^8 values (minutes, gigabytes)
    "alias_bomb": (_alias_bomb(7), ["expands to more than", str(MAX_CONFIG_NODES), "aliases"]),
    # `abs(gap) > nan` is never true: a NaN bound switches the divergence guard off
    "nan_disables_a_guard": ("defaults:\n  amorlip:\n    divergence_bound: .nan\n    ema_alpha: .inf\n"
                             "datasets:\n  emoji-demo: {source: emoji, timeout: -.inf}\n",
                             ["'defaults.amorlip.divergence_bound = nan'", "'defaults.amorlip.ema_alpha = inf'",
                              "'datasets.emoji-demo.timeout = -inf'", "must be finite"]),
    # resources/../urls.parquet
    "dataset_name_escapes": ("datasets:\n  '..': {source: emoji}\ndefaults: {dataset: '..'}\n",
                             ["invalid dataset name '..'", "letters, digits", "[A-Za-z0-9][A-Za-z0-9_.-]"]),
    "seed_beyond_64_bits": ("defaults:\n  seed: 100000000000000000000000\n",
                            ["'defaults.seed'", "maximum of 9223372036854775807"]),
}


@pytest.fixture(scope="module")
def snakemake_outcomes(tmp_path_factory) -> dict[str, dict]:
    """`snakemake -n` with each case as its --configfile (all started together)."""
    root = tmp_path_factory.mktemp("config-files")
    procs = {}
    t0 = time.monotonic()
    for case, (text, _) in {**CASES, "empty": ("", [])}.items():
        cfg = root / f"{case}.yaml"
        cfg.write_text(text)
        workdir = root / f"{case}-workdir"
        workdir.mkdir()
        procs[case] = (subprocess.Popen(
            [str(BIN / "snakemake"), "-n", "--cores", "1", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
             "--configfile", str(cfg)],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), workdir)
    out = {}
    for case, (proc, workdir) in procs.items():
        text, _ = proc.communicate(timeout=240)
        out[case] = {"rc": proc.returncode, "out": text, "workdir": workdir}
    print(f"\n{len(procs)} snakemake -n runs in {time.monotonic() - t0:.1f} s")
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_config_file_is_refused_by_both_doors(snakemake_outcomes, case, tmp_path, capsys):
    text, expected = CASES[case]
    res = snakemake_outcomes[case]
    assert res["rc"] != 0, res["out"][-2000:]
    for part in expected:
        assert part in res["out"], f"snakemake -n output lacks {part!r}:\n{res['out'][-2000:]}"
    assert "Job stats" not in res["out"]
    written = [p for p in Path(res["workdir"]).rglob("*") if ".snakemake" not in p.parts]
    assert written == [], f"files written before the config was rejected: {written}"

    path = tmp_path / "config.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    rc = cli_main(["validate", "--config", str(path)])
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("amorlip: config error") and "\n" not in err and len(err) < 600, err[:1000]
    for part in expected:
        assert part in err, f"amorlip validate message lacks {part!r}: {err}"
    assert took < 5, f"refusing {case} took {took:.1f} s"
    print(f"{case}: {err[:160]} ({took * 1000:.0f} ms)")


def test_empty_config_file_is_refused_by_both_doors(snakemake_outcomes, tmp_path, capsys):
    """An empty file used to validate as the demo config (`config OK`) while Snakemake refused it."""
    res = snakemake_outcomes["empty"]
    assert res["rc"] != 0 and "Job stats" not in res["out"], res["out"][-2000:]
    path = tmp_path / "config.yaml"
    for text in ("", "# all settings commented out\n", "\n\n"):
        path.write_text(text)
        assert cli_main(["validate", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path} is empty" in err and "config/config.yaml" in err, err


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "-rf", "tab\tname", "new\nline", "a*b", "[ab]",
                                  "$(id)", "x" * 101, ""])
def test_run_names_that_escape_or_break_folders_are_refused(name):
    with pytest.raises(ConfigError, match="invalid run name") as info:
        load_config({"runs": {name: {"method": "clip"}}})
    assert "letters, digits" in str(info.value)


def test_names_matching_the_documented_pattern_are_accepted():
    config = load_config({"datasets": {"cc3m.v2_a-1": {"source": "emoji"}},
                          "defaults": {"dataset": "cc3m.v2_a-1"},
                          "runs": {"clip-b64.s0_x": {"method": "clip"}, "0run": {}}})
    assert set(config["runs"]) == {"clip-b64.s0_x", "0run"}


def test_finite_and_64_bit_values_still_load():
    config = load_config({"defaults": {"seed": 2**63 - 1, "amorlip": {"divergence_bound": 1.0e+30}}})
    assert config["defaults"]["seed"] == 2**63 - 1


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """`<<: *base` then an explicit key overrides on purpose; only a key written twice is refused."""
    path = tmp_path / "config.yaml"
    path.write_text("defaults: &base {lr: 0.001, epochs: 2}\nruns:\n  clip:\n    <<: *base\n    epochs: 3\n"
                    "    method: clip\n")
    config = load_config(path)
    assert config["runs"]["clip"] == {"lr": 0.001, "epochs": 3, "method": "clip"}


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("defaults:\n  amorlip:\n    rho: &r [1.0, *r]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_config(path)
    path.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nests too deeply"):
        load_config(path)

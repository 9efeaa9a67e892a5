"""RunConfig.settings: the digest input that decides whether a finished run is stale.

The pipeline reruns a training job when its settings digest changes (workflow/rules/common.smk,
``run_settings``; tests/test_pipeline_e2e.py checks a changed lr retrains that run alone). Here: a
setting at the default of a defaulted field leaves the digest alone, so a version that adds one does
not retrain finished runs, while every value someone sets still counts.
"""

from __future__ import annotations

import dataclasses

from amorlip.config import FastclipConfig, RunConfig, ValidationConfig, get_run, load_config


def _run(tmp_path, **overrides) -> RunConfig:
    config = tmp_path / "config.yaml"
    config.write_text("runs: {a: {method: amorlip}}\n")
    return dataclasses.replace(get_run(load_config(config, check_paths=False), "a"), **overrides)


def test_defaulted_fields_at_their_default_are_left_out(tmp_path):
    run = _run(tmp_path)
    settings = run.settings()
    assert {"lr", "batch_size", "method", "seed", "amorlip"} <= set(settings)  # required fields always count
    for name in ("deterministic", "validation", "zeroshot_during_training", "fastclip", "diagnostics_probe"):
        assert name not in settings, name
    assert "encoder_negatives" not in settings["amorlip"]  # nested: defaulted and at its default
    assert settings["amorlip"]["rho"] == run.amorlip.rho


def test_a_value_someone_sets_counts_even_in_a_defaulted_field(tmp_path):
    base = _run(tmp_path).settings()
    assert _run(tmp_path, deterministic=True).settings() == {**base, "deterministic": True}
    changed = _run(tmp_path, validation=ValidationConfig(every_epochs=2)).settings()
    assert changed == {**base, "validation": {"every_epochs": 2}}
    assert _run(tmp_path, fastclip=FastclipConfig(gamma_min=0.3)).settings()["fastclip"] == {"gamma_min": 0.3}
    assert _run(tmp_path, lr=0.000777).settings()["lr"] == 0.000777

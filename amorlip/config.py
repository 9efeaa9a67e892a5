"""Load, validate and expand the pipeline configuration.

One YAML file, one JSON schema (``workflow/schemas/config.schema.yaml``) that carries every default.
An invalid config fails here, before Snakemake schedules any job, with a message that names the
offending key. Runs are expanded from ``defaults`` + ``runs`` (+ an optional ``sweep`` grid) into
typed :class:`RunConfig` objects that the trainer, evaluator and report share.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"

# Variant defaults (method notes 1.8): resolved here, in one place, and recorded in each run's
# exported config so a report always says which choice ran.
VARIANT_DEFAULTS = {
    "published": {"pos_coef": 1e-3, "encoder_partition": "mixed_target"},
    "paper": {"pos_coef": 1.0, "encoder_partition": "ema_net"},
}


_YAML11_TEXT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what to do."""


def _key_path(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def _extend_with_defaults(validator_class):
    """A validator that fills ``default`` values while it validates (jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
                elif "$ref" in subschema and name not in instance:
                    resolved = validator._resolver.lookup(subschema["$ref"]).contents
                    if "default" in resolved:
                        instance[name] = copy.deepcopy(resolved["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def load_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _format_error(err: jsonschema.ValidationError) -> str:
    where = _key_path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in err.schema.get("properties", {})]
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        keys = ", ".join(f"'{where + '.' if where != '<top level>' else ''}{k}'" for k in extra)
        return f"unknown key {keys}{hint}"
    if err.validator == "oneOf" and isinstance(err.instance, dict):
        # a run entry: report the most specific inner error instead of "is not valid under any"
        inner = [e for e in err.context if e.relative_schema_path and e.relative_schema_path[0] == 0]
        if inner:
            return _format_error(inner[0])
    if err.validator == "type" and isinstance(err.instance, str) and _YAML11_TEXT_NUMBER.fullmatch(err.instance):
        # YAML 1.1 (PyYAML, Snakemake) reads 1e-4 and 1.5e3 as text: a float needs '.' and a signed exponent
        return (f"invalid value at '{where}': {err.message}; YAML reads {err.instance} as text, "
                "write the number with a decimal point and a signed exponent (e.g. 1.0e-4, 1.5e+3)")
    return f"invalid value at '{where}': {err.message}"


def _prefixed(err: jsonschema.ValidationError, key: str) -> jsonschema.ValidationError:
    err.path.appendleft(key)
    return err


def validate(raw: Mapping[str, Any]) -> dict:
    """Validate ``raw`` against the schema and return a copy with every default filled in."""
    config = copy.deepcopy(dict(raw or {}))
    schema = load_schema()
    # Run entries are partial overrides of `defaults`: check them without filling defaults, or a
    # run's filled-in default would silently override the user's `defaults` block.
    errors = []
    runs = config.pop("runs", copy.deepcopy(schema["properties"]["runs"]["default"]))
    plain = jsonschema.Draft202012Validator({"$defs": schema["$defs"], **schema["properties"]["runs"]})
    errors += [_prefixed(e, "runs") for e in plain.iter_errors(runs)]
    runs_schema = schema["properties"].pop("runs")
    validator = _DefaultFillingValidator(schema)
    errors += list(validator.iter_errors(config))
    schema["properties"]["runs"] = runs_schema
    config["runs"] = runs
    errors = sorted(errors, key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        lines = [_format_error(e) for e in errors[:5]]
        raise ConfigError("config error: " + "; ".join(lines))
    # nested objects reached through a default (e.g. datasets.*.emoji) need a second pass so their
    # own defaults are filled too; the result is idempotent.
    runs = config.pop("runs")
    schema["properties"].pop("runs")
    list(_DefaultFillingValidator(schema).iter_errors(config))
    config["runs"] = runs
    return config


@dataclasses.dataclass(frozen=True)
class AmorlipConfig:
    pos_coef: float
    encoder_partition: str
    lambda_loss: str
    div_reg_coef: float
    lambda_lr: float
    lambda_hidden_factor: float
    t_online: int
    t_lambda: int
    t_target: int
    ema_alpha: float
    beta_max: float
    beta_epochs: int
    rho: tuple[float, ...]
    scale_loss: bool
    reinit_every_epochs: int
    lambda_grad_clip: float | None
    divergence_bound: float


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training configuration, with every default and variant choice resolved."""

    name: str
    method: str
    variant: str
    dataset: str
    model: str
    batch_size: int
    epochs: int
    samples_per_epoch: int | None
    max_steps: int | None
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    adam_betas: tuple[float, float]
    adam_eps: float
    lr_logit_scale: float | None
    init_logit_scale: float
    max_logit_scale: float
    precision: str
    zero_stage: int
    nproc: int
    nodes: int
    workers: int
    seed: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    siglip_init_bias: float
    amorlip: AmorlipConfig

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        d = dict(d)
        am = dict(d.pop("amorlip"))
        am["rho"] = tuple(am["rho"])
        d["adam_betas"] = tuple(d["adam_betas"])
        return cls(amorlip=AmorlipConfig(**am), **d)


def _deep_merge(base: dict, override: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _sweep_runs(sweep: Mapping[str, Any]) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    for method, bs, seed in itertools.product(sweep["method"], sweep["batch_size"], sweep["seed"]):
        variants = sweep["variant"] if method == "amorlip" else [None]
        for variant in variants:
            name = f"{method}{'-' + variant if variant else ''}-b{bs}-s{seed}"
            run = {"method": method, "batch_size": bs, "seed": seed}
            if variant:
                run["variant"] = variant
            runs[name] = run
    return runs


def _resolve_run(name: str, merged: dict) -> RunConfig:
    merged = copy.deepcopy(merged)
    # fill defaults of the run schema for keys only the run set (e.g. a partial amorlip block)
    schema = load_schema()
    run_schema = {"$defs": schema["$defs"], "$ref": "#/$defs/run"}
    _DefaultFillingValidator(run_schema).validate(merged)
    am = merged["amorlip"]
    for key, value in VARIANT_DEFAULTS[merged["variant"]].items():
        if am.get(key) is None:
            am[key] = value
    if merged["method"] != "amorlip":
        # CLIP and SigLIP runs carry no variant: record that plainly rather than a misleading default
        merged["variant"] = "none"
    return RunConfig.from_dict({"name": name, **merged})


def expand_runs(config: Mapping[str, Any]) -> dict[str, RunConfig]:
    """Named runs: ``defaults`` overlaid by each ``runs`` entry and each ``sweep`` grid point."""
    entries: dict[str, dict] = {}
    for name, override in (config.get("runs") or {}).items():
        entries[name] = override or {}
    if config.get("sweep"):
        for name, override in _sweep_runs(config["sweep"]).items():
            if name in entries:
                raise ConfigError(f"config error: run '{name}' is defined by both 'runs' and 'sweep'")
            entries[name] = override
    if not entries:
        raise ConfigError("config error: no runs: set 'runs' or 'sweep'")
    runs = {}
    for name, override in entries.items():
        if not name or any(c in name for c in "/\\ ;'\"$`") or name.startswith("."):
            raise ConfigError(
                f"config error: invalid run name {name!r} at 'runs': use letters, digits, '-', '_' and '.'"
            )
        runs[name] = _resolve_run(name, _deep_merge(config["defaults"], override))
    return runs


def _check_semantics(config: dict, runs: Mapping[str, RunConfig], check_paths: bool) -> None:
    from amorlip.models import known_model_names

    models = known_model_names()
    for name, run in runs.items():
        where = f"runs.{name}"
        if run.dataset not in config["datasets"]:
            raise ConfigError(
                f"config error at '{where}.dataset': unknown dataset '{run.dataset}' "
                f"(defined: {', '.join(sorted(config['datasets']))})"
            )
        if run.model not in models:
            raise ConfigError(
                f"config error at '{where}.model': unknown model '{run.model}'; use an open_clip name "
                f"(e.g. RN50, ViT-B-32) or one of amorlip's configs ({', '.join(sorted(m for m in models if m.startswith('amorlip')))})"
            )
        if run.batch_size % run.world_size:
            raise ConfigError(
                f"config error at '{where}.batch_size': {run.batch_size} is not divisible by "
                f"nproc x nodes = {run.world_size}; choose a multiple of {run.world_size}"
            )
    has_emoji = any(ds["source"] == "emoji" for ds in config["datasets"].values())
    if config["evaluation"]["suites"] is None:
        # the schema's documented default, which depends on what the config trains on
        config["evaluation"]["suites"] = ["emoji-heldout"] if has_emoji else ["datacomp"]
    if "emoji-heldout" in config["evaluation"]["suites"] and not has_emoji:
        raise ConfigError(
            "config error at 'evaluation.suites': 'emoji-heldout' is the demo's held-out-style suite and "
            "needs a dataset with source 'emoji'; use suites: [datacomp] for url-list datasets"
        )
    for dname, ds in config["datasets"].items():
        where = f"datasets.{dname}"
        if ds["source"] == "url_list":
            if not ds.get("url_list"):
                raise ConfigError(f"config error at '{where}.url_list': required when source is 'url_list'")
            if check_paths and not Path(ds["url_list"]).exists():
                raise ConfigError(
                    f"config error at '{where}.url_list': file not found: {ds['url_list']} "
                    "(download the url list first; see README 'Datasets')"
                )
        else:
            em = ds["emoji"]
            if em["heldout_style"] in em["train_styles"]:
                raise ConfigError(
                    f"config error at '{where}.emoji.heldout_style': '{em['heldout_style']}' is also a "
                    "training style; the held-out style must be unseen in training"
                )


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> dict:
    """Read (if a path), validate and fill defaults; raise :class:`ConfigError` naming the key."""
    if source is None or isinstance(source, Mapping):
        raw = dict(source or {})
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config error: config file not found: {path}")
        try:
            with open(path) as fh:
                raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config error: {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config error: {path} must hold a mapping at the top level")
    config = validate(raw)
    runs = expand_runs(config)
    _check_semantics(config, runs, check_paths)
    return config


def get_run(config: Mapping[str, Any], name: str) -> RunConfig:
    runs = expand_runs(config)
    if name not in runs:
        raise ConfigError(f"config error: no run named '{name}' (runs: {', '.join(sorted(runs))})")
    return runs[name]


def tracking_uri(config: Mapping[str, Any]) -> str:
    """MLFLOW_TRACKING_URI wins, then the config, then a SQLite file under results/."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if config["mlflow"]["tracking_uri"]:
        return config["mlflow"]["tracking_uri"]
    db = Path(config["paths"]["results"]).resolve() / "mlflow.db"
    return f"sqlite:///{db}"

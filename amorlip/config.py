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
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"

# Variant defaults: resolved here, in one place, and recorded in each run's exported config so a
# report always says which choice ran.
VARIANT_DEFAULTS = {
    "published": {"pos_coef": 1e-3, "encoder_partition": "mixed_target"},
    "paper": {"pos_coef": 1.0, "encoder_partition": "ema_net"},
}
# where each AmorLIP variant comes from, in words (the report names it beside the settings above)
VARIANT_ORIGIN = {
    "published": "what the authors' code ran: Lambda = mixed target",
    "paper": "the paper's Eq. 6: Lambda = EMA lambda net",
}
# each method's variants, the first one its default; clip and siglip have none (recorded as "none")
METHOD_VARIANTS = {
    "amorlip": tuple(VARIANT_DEFAULTS),
    # v3: FastCLIP-v3 (cosine gamma, learnable temperature with rho); sogclr: constant gamma, fixed temperature
    "fastclip": ("v3", "sogclr"),
}


_YAML11_TEXT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what to do."""


# Dataset and run names become folder names (resources/{dataset}, runs/{run}), Snakemake wildcard
# values and MLflow run names: one pattern for both, checked before anything uses them, so `..`, `/`,
# a leading `-` (read as an option), control, shell or glob characters never reach a path or a shell.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = ("letters, digits, '-', '_' and '.', starting with a letter or digit, at most 100 characters "
             f"(pattern {NAME_PATTERN})")

# A config is a few KiB. The caps stop a hostile or broken file before it costs anything: a YAML
# "billion laughs" (anchors of anchors) is small on disk but every consumer that walks it (the schema
# validator, deepcopy, the digests) pays for the fully expanded tree, ~10x per nesting level.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def _check_yaml_nodes(root: yaml.Node, path: Path) -> None:
    """Refuse alias expansion beyond :data:`MAX_CONFIG_NODES`, recursive aliases and duplicate keys.

    Works on the composed node graph, before any Python object is built: the expanded size is counted
    with a memo per node (linear in the file, whatever the nesting), and only a graph under the cap is
    then walked key by key. PyYAML keeps the last of two equal keys, silently: a second ``runs.clip``
    would replace the first (a run called ``clip`` training SigLIP), so a repeated key is an error
    naming both lines.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"config error: {path} line {node.start_mark.line + 1}: a YAML alias refers "
                              "to the node that contains it (a recursive alias); write the value out")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += expanded(k) + expanded(v)
                if total > MAX_CONFIG_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += expanded(v)
                if total > MAX_CONFIG_NODES:
                    break
        active.discard(key)
        sizes[key] = total
        if total > MAX_CONFIG_NODES:
            raise ConfigError(
                f"config error: {path} expands to more than {MAX_CONFIG_NODES} YAML values through its "
                "aliases (*name); a pipeline config needs a few hundred: write the values out instead "
                "of nesting aliases")
        return total

    expanded(root)

    def walk(node: yaml.Node, where: list[str]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` overrides on purpose
                    walk(v, where)
                    continue
                name = str(k.value) if isinstance(k, yaml.ScalarNode) else "<complex key>"
                line = k.start_mark.line + 1
                if name in seen:
                    raise ConfigError(
                        f"config error: duplicate key '{_key_path([*where, name])}' in {path} at line {line} "
                        f"(first given at line {seen[name]}); YAML would silently keep only the last one: "
                        "remove or rename one of them")
                seen[name] = line
                walk(v, [*where, name])
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, [*where, str(i)])

    walk(root, [])


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a config file strictly: size and alias caps, no duplicate keys, not empty, a mapping.

    Snakemake parses ``--configfile`` itself (keeping the last duplicate, expanding nothing); the
    Snakefile calls this on the same files so both doors (``snakemake`` and ``amorlip validate``)
    refuse the same files with the same message.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config error: {path} is {size} bytes; a pipeline config is a few KiB "
                          f"(limit {MAX_CONFIG_BYTES}): is this the right file?")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config error: {path} line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); "
                          "save the file as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"config error: {path} nests too deeply to be a pipeline config") from None
    if root is None:
        raise ConfigError(f"config error: {path} is empty (no settings); start from a copy of "
                          "config/config.yaml, the complete demo config")
    _check_yaml_nodes(root, path)
    loader = yaml.SafeLoader("")
    try:
        raw = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path} must hold a mapping (key: value lines) at the top level, "
                          f"not a {type(raw).__name__}")
    return raw


def _non_finite(obj: Any, where: list[str]) -> Iterator[str]:
    """Dotted keys of every NaN or infinite number under ``obj``.

    JSON Schema cannot say "finite": ``nan > 0`` and ``nan < 1`` are both false, so ``.nan`` passes
    every bound, and a NaN bound disables the guard it configures (``abs(gap) > nan`` is never true).
    No key of the config has a meaning for NaN or infinity, so all are refused.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        yield f"{_key_path(where)} = {obj}"
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _non_finite(v, [*where, str(k)])
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _non_finite(v, [*where, str(i)])


def _check_names(config: Mapping[str, Any]) -> None:
    for section, kind in (("datasets", "dataset"), ("runs", "run")):
        block = config.get(section)
        if not isinstance(block, Mapping):
            continue  # the schema reports the type
        for name in block:
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise ConfigError(f"config error: invalid {kind} name {name!r} at '{section}': use {NAME_RULE}")


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
    bad = list(itertools.islice(_non_finite(config, []), 5))
    if bad:
        raise ConfigError(f"config error: non-finite number(s) at {', '.join(repr(b) for b in bad)}; "
                          "every number in the config must be finite (no .nan / .inf)")
    _check_names(config)
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


def _non_default(obj) -> dict:
    """A dataclass as a dict, recursively, leaving out defaulted fields equal to their default."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if default is not dataclasses.MISSING and value == default:
            continue
        out[field.name] = _non_default(value) if dataclasses.is_dataclass(value) else value
    return out


@dataclasses.dataclass(frozen=True)
class AmorlipConfig:
    pos_coef: float
    encoder_partition: str
    lambda_loss: str
    div_reg_coef: float
    lambda_lr: float
    lambda_lr_scaling: str
    lambda_hidden_factor: float
    t_online: int
    t_lambda: int
    t_target: int
    ema_alpha: float
    beta_max: float
    beta_epochs: int
    rho: tuple[float, ...]
    rho_epochs: tuple[int, ...] | None
    scale_loss: bool
    reinit_every_epochs: int
    lambda_grad_clip: float | None
    divergence_bound: float
    # defaulted: a model.pt exported before these settings existed still loads
    encoder_negatives: str = "global"
    local_warmup_steps: int = 50


@dataclasses.dataclass(frozen=True)
class FastclipConfig:
    """FastCLIP's hyperparameters (docs/variants.md, "FastCLIP"); the defaults mirror the schema's."""

    gamma_min: float = 0.2
    gamma_decay_epochs: int = 10
    gamma: float = 0.9
    rho: float = 6.5
    eps: float = 1e-14


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """The fixed-batch validation metric (amorlip/train/validation.py); the defaults mirror the schema's."""

    every_epochs: int = 1
    every_steps: int = 0
    batch_size: int = 256
    temperature: float = 0.07
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.every_steps > 0


@dataclasses.dataclass(frozen=True)
class ZeroShotDuringTrainingConfig:
    """Zero-shot evaluation during training (amorlip/train/zeroshot_hook.py); the defaults mirror the schema's."""

    every_epochs: int = 0
    suite: str = "emoji-heldout"

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0


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
    lr_logit_scale_thresh: float | None
    lr_logit_scale_thresh_ratio: float
    init_logit_scale: float
    max_logit_scale: float
    precision: str
    zero_stage: int
    zero_bucket_size: int
    zero_overlap_comm: bool
    nproc: int
    nodes: int
    workers: int
    seed: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    siglip_init_bias: float
    amorlip: AmorlipConfig
    deterministic: bool = False  # defaulted: a model.pt exported before the setting existed still loads
    diagnostics_every_epochs: int = 1  # defaulted, as above
    diagnostics_probe: int = 1024
    fastclip: FastclipConfig = dataclasses.field(default_factory=FastclipConfig)  # defaulted, as above
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)  # defaulted, as above
    zeroshot_during_training: ZeroShotDuringTrainingConfig = dataclasses.field(
        default_factory=ZeroShotDuringTrainingConfig)  # defaulted, as above

    @property
    def world_size(self) -> int:
        """The configured rank count; the launched one lives in :class:`amorlip.distributed.WorldInfo`,
        which checks that the two agree and owns the local batch size."""
        return self.nproc * self.nodes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self) -> dict:
        """:meth:`to_dict` without the defaulted fields (nested too) that hold their default: what the
        pipeline digests to decide whether a finished run is stale (workflow/rules/common.smk,
        ``run_settings``). A setting a newer version adds, at its default, then changes nothing, so an
        upgrade never retrains finished runs; a value someone set (or a required field) always counts."""
        return _non_default(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        d = dict(d)
        am = dict(d.pop("amorlip"))
        am["rho"] = tuple(am["rho"])
        am["rho_epochs"] = tuple(am["rho_epochs"]) if am.get("rho_epochs") is not None else None
        d["adam_betas"] = tuple(d["adam_betas"])
        if "fastclip" in d:
            d["fastclip"] = FastclipConfig(**d["fastclip"])
        if "validation" in d:
            d["validation"] = ValidationConfig(**d["validation"])
        if "zeroshot_during_training" in d:
            d["zeroshot_during_training"] = ZeroShotDuringTrainingConfig(**d["zeroshot_during_training"])
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
        variants = [v for v in sweep["variant"] if v in METHOD_VARIANTS[method]] if method in METHOD_VARIANTS else [None]
        variants = variants or [None]  # none of the grid's variants is this method's: its default
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
    method, variant = merged["method"], merged.get("variant")
    allowed = METHOD_VARIANTS.get(method, ())
    if variant is None or not allowed:
        # a method without variants ignores one set (e.g. by defaults for the amorlip runs)
        variant = allowed[0] if allowed else None
    elif variant not in allowed:
        raise ConfigError(f"config error at 'runs.{name}.variant': {variant!r} is not a variant of method {method!r}"
                          f" ({', '.join(allowed) if allowed else 'it has none: leave variant unset'})")
    am = merged["amorlip"]
    # the amorlip block of any other method keeps the published defaults (it is unused there)
    for key, value in VARIANT_DEFAULTS[variant if method == "amorlip" else "published"].items():
        if am.get(key) is None:
            am[key] = value
    # CLIP and SigLIP runs carry no variant: record that plainly rather than a misleading default
    merged["variant"] = variant or "none"
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
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(f"config error: invalid run name {name!r} at 'runs': use {NAME_RULE}")
        runs[name] = _resolve_run(name, _deep_merge(config["defaults"], override))
    return runs


def _check_semantics(config: dict, runs: Mapping[str, RunConfig], check_paths: bool) -> None:
    from amorlip.model_names import known_model_names  # no torch: this runs at Snakemake parse time

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
        rho_epochs = run.amorlip.rho_epochs
        # only AmorLIP reads amorlip.*: a peer run of another length beside AmorLIP ones (FastCLIP's 37
        # epochs next to AmorLIP's 30 in config/cc3m-rn50.yaml) inherits the block unused
        if (run.method == "amorlip" and rho_epochs is not None
                and (len(rho_epochs) != len(run.amorlip.rho) or sum(rho_epochs) != run.epochs)):
            raise ConfigError(
                f"config error at '{where}.amorlip.rho_epochs': {list(rho_epochs)} must give one epoch count per "
                f"rho value ({len(run.amorlip.rho)}) summing to epochs ({run.epochs})"
            )
        am = run.amorlip
        if run.method == "amorlip" and am.encoder_negatives == "local" and am.encoder_partition != "ema_net":
            raise ConfigError(
                f"config error at '{where}.amorlip.encoder_negatives': 'local' needs a Lambda from the lambda "
                f"nets (encoder_partition: ema_net, the 'paper' variant), not '{am.encoder_partition}': the mixed "
                "target contains the current global partition sum, which local negatives exist to avoid "
                "gathering on every step; set variant: paper or encoder_partition: ema_net"
            )
        if (run.method == "amorlip" and am.encoder_negatives == "local" and run.world_size > 1
                and run.batch_size < 2 * run.world_size):
            raise ConfigError(
                f"config error at '{where}.amorlip.encoder_negatives': 'local' scales the local off-diagonal "
                f"sum by (G-1)/(B-1), which needs a local batch B >= 2; batch_size {run.batch_size} over "
                f"{run.world_size} ranks gives B = {run.batch_size // run.world_size}"
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
    for name, run in runs.items():
        zs, where = run.zeroshot_during_training, f"runs.{name}.zeroshot_during_training"
        if not zs.enabled:
            continue
        if zs.suite not in config["evaluation"]["suites"]:
            raise ConfigError(
                f"config error at '{where}.suite': '{zs.suite}' is not one of evaluation.suites "
                f"({', '.join(config['evaluation']['suites'])})"
            )
        if run.zero_stage == 3:
            raise ConfigError(
                f"config error at '{where}.every_epochs': zero-shot evaluation during training needs the full "
                "encoders on rank 0, which ZeRO-3 partitions over the ranks; use zero_stage 0-2, or evaluate "
                "the exported model afterwards (amorlip evaluate)"
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
        raw = read_config_file(source)
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

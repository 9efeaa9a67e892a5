"""Evaluate one exported run on one suite: every task, its main metric, chance, suite aggregates.

``results/{run}/{suite}.json`` (docs/architecture.md, "Results") is the contract with the report.
Two rules keep the numbers honest:

- a task whose eval set is absent or incomplete (or that has no main metric, such as FairFace) is
  reported as ``{"missing": reason}`` and never enters an average as a zero;
- every aggregate says how many tasks it covers (``covered`` of ``total``), so a partial DataComp
  mean is never mistaken for the 38-task average.

All metrics are fractions in [0, 1] (clip_benchmark's convention); the report shows percentages.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from amorlip.evaluate import winogavil, zeroshot
from amorlip.evaluate.suites import Suite, Task, get_suite
from amorlip.fileio import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("task", "name", "type", "group", "main_metric", "main", "chance", "status")


# --------------------------------------------------------------------------- one task


def task_problem(task: Task) -> str | None:
    """Why ``task`` cannot be evaluated from its folder (None when it can)."""
    if task.unsupported:
        return task.unsupported
    folder = Path(task.path)
    if task.type == "winogavil":
        return winogavil.problem(folder)
    if not folder.is_dir():
        return f"eval set not found at {folder}"
    try:
        shards = zeroshot.shard_paths(folder)
    except (OSError, ValueError) as exc:
        return f"incomplete eval set at {folder}: test/nshards.txt unreadable ({exc})"
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        return f"incomplete eval set at {folder}: missing shard(s) {', '.join(absent[:5])}"
    if task.type == "classification":
        for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
            if not (folder / name).is_file():
                return f"incomplete eval set at {folder}: {name} missing"
    return None


def evaluate_task(model, tokenizer, transform: Callable, task: Task, device: str = "cpu",
                  batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """The result entry of one task: metrics, main metric and value, chance; or ``{"missing": ...}``."""
    info = {"name": task.name, "group": task.group, "main_metric": task.main_metric, "type": task.type}
    problem = task_problem(task)
    if problem:
        return {"missing": problem, **info}
    if task.type == "retrieval":
        metrics = zeroshot.evaluate_retrieval(model, tokenizer, task.path, transform, device, batch_size, workers)
    elif task.type == "winogavil":
        metrics = winogavil.evaluate_winogavil(model, tokenizer, task.path, transform, device, batch_size, workers)
    else:
        extra = task.main_metric if task.main_metric in zeroshot.EXTRA_METRICS else None
        metrics = zeroshot.evaluate_classification(model, tokenizer, task.path, transform, device,
                                                   batch_size, workers, extra_metric=extra)
    main = metrics.get(task.main_metric)
    if main is None:
        return {"missing": f"main metric {task.main_metric} not produced (got {sorted(metrics)})",
                "metrics": metrics, **info}
    if task.type == "winogavil":  # the expected Jaccard index of random picks, over the same games
        chance = metrics.get(f"chance_{task.main_metric}")
    else:
        chance = zeroshot.chance_level(task.main_metric, num_classes=metrics.get("num_classes"),
                                       num_samples=metrics.get("num_samples"))
    return {"metrics": metrics, "main": float(main), "chance": chance, **info}


# --------------------------------------------------------------------------- aggregation


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(suite: Suite, tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Suite mean and group means over the *covered* scored tasks, with coverage counts.

    ``mean_main`` is None (not 0) when nothing is covered; ``total`` counts the tasks that have a
    main metric (38 for DataComp).
    """
    scored = suite.scored_tasks
    covered = [t for t in scored if "main" in tasks.get(t.key, {})]
    groups, groups_covered = {}, {}
    for group, keys in suite.groups.items():
        values = [tasks[k]["main"] for k in keys if "main" in tasks.get(k, {})]
        groups[group] = _mean(values)
        groups_covered[group] = {"covered": len(values), "total": len(keys)}
    chances = [tasks[t.key]["chance"] for t in covered if tasks[t.key].get("chance") is not None]
    return {
        "mean_main": _mean([tasks[t.key]["main"] for t in covered]),
        "groups": groups,
        "covered": len(covered),
        "total": len(scored),
        "groups_covered": groups_covered,
        "missing": [t.key for t in scored if t not in covered],
        "chance_mean_main": _mean(chances) if len(chances) == len(covered) else None,
    }


def evaluate_suite(model, tokenizer, transform: Callable, suite: Suite, device: str = "cpu",
                   batch_size: int = 64, workers: int = 0, run: str | None = None) -> dict[str, Any]:
    """Evaluate every task of ``suite``; a task that fails is reported missing with the error."""
    tasks: dict[str, dict] = {}
    for i, task in enumerate(suite.tasks, 1):
        t0 = time.perf_counter()
        try:
            entry = evaluate_task(model, tokenizer, transform, task, device, batch_size, workers)
        except Exception as exc:  # noqa: BLE001 -- one broken set must not lose the others' results
            log.exception("task %s failed", task.key)
            entry = {"missing": f"evaluation failed: {type(exc).__name__}: {exc}", "name": task.name,
                     "group": task.group, "main_metric": task.main_metric, "type": task.type}
        tasks[task.key] = entry
        if "main" in entry:
            log.info("[%d/%d] %s: %s = %.2f%% (chance %s) in %.1fs", i, len(suite.tasks), task.key,
                     task.main_metric, 100 * entry["main"], _pct(entry.get("chance")), time.perf_counter() - t0)
        else:
            log.info("[%d/%d] %s: missing (%s)", i, len(suite.tasks), task.key, entry["missing"])
    return {
        "run": run,
        "suite": suite.name,
        "tasks": tasks,
        "aggregates": aggregate(suite, tasks),
        "chance": {k: v.get("chance") for k, v in tasks.items() if "main" in v},
    }


# --------------------------------------------------------------------------- output


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def task_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per task: key, name, group, main metric and value, chance, status."""
    rows = []
    for key, entry in results["tasks"].items():
        rows.append({
            "task": key, "name": entry.get("name", key), "type": entry.get("type"),
            "group": entry.get("group") or "", "main_metric": entry.get("main_metric") or "",
            "main": entry.get("main"), "chance": entry.get("chance"),
            "status": "ok" if "main" in entry else f"missing: {entry.get('missing')}",
        })
    return rows


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None: JSON has no NaN and the report must never read one as a number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(results: Mapping[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the results JSON (atomically: a half-written file never looks done) and the task CSV."""
    out = Path(out)
    atomic_write_json(out, _json_safe(results), allow_nan=False)
    table = out.with_suffix(".csv")
    with atomic_path(table) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(task_table(results))
    return out, table


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / :`` and spaces; ``@`` becomes ``_at_``."""
    return re.sub(r"[^\w\-./: ]", "_", name.replace("@", "_at_"))


def mlflow_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Each covered task's main metric and the suite aggregates, as flat MLflow metrics."""
    metrics = {}
    for key, entry in results["tasks"].items():
        if "main" in entry:
            metrics[metric_name(f"main/{key}")] = entry["main"]
    agg = results["aggregates"]
    for name in ("mean_main", "covered", "total", "chance_mean_main"):
        if agg.get(name) is not None:
            metrics[f"suite/{name}"] = agg[name]
    for group, value in agg["groups"].items():
        if value is not None:
            metrics[metric_name(f"group/{group}")] = value
    return metrics


def training_run_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The zero-shot results as the training run carries them: ``eval/<suite>/<task>`` (each task's
    main metric), ``eval/<suite>/mean_main`` and ``eval/<suite>/group/<group>``, all in percent (the
    unit of the summary table), so one runs table sorts and plots accuracy against any param."""
    suite = results["suite"]
    metrics = {}
    for key, entry in results["tasks"].items():
        if entry.get("main") is not None:
            metrics[metric_name(f"eval/{suite}/{key}")] = 100.0 * entry["main"]
    agg = results["aggregates"]
    for name in ("mean_main", "chance_mean_main"):
        if agg.get(name) is not None:
            metrics[metric_name(f"eval/{suite}/{name}")] = 100.0 * agg[name]
    if agg.get("covered") is not None:
        metrics[metric_name(f"eval/{suite}/covered")] = agg["covered"]
    for group, value in agg["groups"].items():
        if value is not None:
            metrics[metric_name(f"eval/{suite}/group/{group}")] = 100.0 * value
    return metrics


def summary_line(results: Mapping[str, Any]) -> str:
    agg = results["aggregates"]
    groups = ", ".join(f"{g} {_pct(v)}" for g, v in agg["groups"].items() if v is not None)
    return (f"{results['run']} on {results['suite']}: mean main metric {_pct(agg['mean_main'])} over "
            f"{agg['covered']}/{agg['total']} tasks (chance {_pct(agg['chance_mean_main'])})"
            + (f"; {groups}" if groups else "")
            + (f"; missing: {', '.join(agg['missing'])}" if agg["missing"] else ""))


# --------------------------------------------------------------------------- the pipeline step


def evaluate(config: Mapping[str, Any], run: str, suite: str, out: str | os.PathLike) -> dict[str, Any]:
    """``amorlip evaluate``: load ``runs/{run}/model.pt``, evaluate ``suite``, write ``out``, log to MLflow."""
    from amorlip.devices import enable_tf32, eval_device
    from amorlip.model_file import load_exported

    # the job's own GPU, not any GPU the node shows (a CPU job on a GPU node must stay on the CPU)
    device = eval_device(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.startswith("cuda"):
        enable_tf32()
    log.info("evaluating on %s%s", device, " (TF32 matmuls)" if device.startswith("cuda") else "")
    model_path = Path(config["paths"]["runs"]) / run / "model.pt"
    model, transform, tokenizer, meta = load_exported(model_path, device)
    return evaluate_loaded(config, run, suite, out, model, transform, tokenizer, meta=meta, device=device,
                           model_path=model_path)


def evaluate_loaded(config: Mapping[str, Any], run: str, suite: str, out: str | os.PathLike, model,
                    transform: Callable, tokenizer, meta: Mapping[str, Any] | None = None, device: str = "cpu",
                    model_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate an already loaded model (any object with ``encode_image``/``encode_text``) as run ``run``.

    The MLflow child run is named ``{run}/{suite}`` (tag ``amorlip.kind = evaluate``) and holds each
    task's main metric, the aggregates, and the results JSON + per-task CSV as artifacts.
    """
    from amorlip.tracking import attach_run, child_run, train_run_id

    meta = dict(meta or {})
    run_meta = meta.get("run") or {}
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    suite_def = get_suite(config, suite)
    ev = config["evaluation"]
    train_id = train_run_id(config, run)
    tags = {"amorlip.run": run, "amorlip.suite": suite} | ({"amorlip.train_run_id": train_id} if train_id else {})
    with child_run(config, f"{run}/{suite}", "evaluate", tags=tags) as tracker:
        tracker.log_params({
            "run": run, "suite": suite, "device": device, "batch_size": ev["batch_size"],
            "workers": ev["workers"], "tasks": len(suite_def.tasks),
            "model": run_meta.get("model", meta.get("model_name")), "method": run_meta.get("method"),
            "variant": run_meta.get("variant"), "step": meta.get("step"),
        })
        t0 = time.perf_counter()
        results = evaluate_suite(model, tokenizer, transform, suite_def, device=device,
                                 batch_size=ev["batch_size"], workers=ev["workers"], run=run)
        results["model"] = {"path": str(model_path) if model_path else None, "step": meta.get("step"),
                            "method": run_meta.get("method"), "variant": run_meta.get("variant")}
        results["wall_time_s"] = round(time.perf_counter() - t0, 2)
        results["mlflow_run_id"] = tracker.run_id
        json_path, csv_path = write_results(results, out)
        tracker.log_metrics(mlflow_metrics(results), step=0)
        tracker.log_artifact(json_path)
        tracker.log_artifact(csv_path)
    # the same results, in percent, on the training run itself (linked back to this evaluation run)
    offline = Path(config["paths"]["results"]) / "mlflow-offline" / f"train-eval-{run}-{suite}.jsonl"
    train_tracker = attach_run(config, train_id, offline)
    if train_tracker is not None:
        train_tracker.log_metrics(training_run_metrics(results), step=int(meta.get("step") or 0))
        if tracker.run_id:
            train_tracker.set_tags({f"amorlip.eval_run_id.{suite}": tracker.run_id})
    log.info("%s", summary_line(results))
    return results

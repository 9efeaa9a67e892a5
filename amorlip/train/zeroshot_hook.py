"""Zero-shot evaluation of the current weights during training (run key ``zeroshot_during_training``).

At the end of every ``every_epochs``-th epoch and at the end of training, rank 0 evaluates the model
it trains (``engine.module``, in eval mode and without gradients; train mode is restored after) on one
suite of ``evaluation.suites`` with the evaluation runner (:func:`amorlip.evaluate.runner.evaluate_suite`),
the run model's eval transform and tokenizer, and ``evaluation.batch_size`` / ``evaluation.workers``: the
numbers are those ``amorlip evaluate`` gives the same weights exported. The trainer logs them in percent,
the unit of the ``eval/<suite>/<task>`` metrics that evaluation puts on the training run. ZeRO-3 is refused
at config load (the encoders are partitioned over the ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from amorlip.evaluate.runner import metric_name


class ZeroShotDuringTraining:
    """Evaluates a model on the configured suite; built once per run (the suite is resolved up front,
    so a missing eval set stops the job before the first step, not after the first epoch)."""

    def __init__(self, config: Mapping[str, Any], run, device) -> None:
        from amorlip.evaluate.suites import get_suite
        from amorlip.models import get_tokenizer, image_transform

        self.cfg = run.zeroshot_during_training
        self.suite = get_suite(config, self.cfg.suite)
        self.transform = image_transform(run.model, train=False)
        self.tokenizer = get_tokenizer(run.model)
        self.device = str(device)
        self.batch_size = int(config["evaluation"]["batch_size"])
        self.workers = int(config["evaluation"]["workers"])

    def due(self, epoch: int, final: bool) -> bool:
        """At the end of epoch ``epoch`` (0-based): every ``every_epochs``-th epoch, and the last."""
        every = self.cfg.every_epochs
        return every > 0 and (final or (epoch + 1) % every == 0)

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        """The runner's results for ``model`` (fractions, as ``results/{run}/{suite}.json`` holds them)."""
        from amorlip.evaluate.runner import evaluate_suite

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return evaluate_suite(model, self.tokenizer, self.transform, self.suite, device=self.device,
                                      batch_size=self.batch_size, workers=self.workers)
        finally:
            model.train(was_training)


def percent_figures(results: Mapping[str, Any]) -> tuple[float | None, dict[str, float]]:
    """``(suite mean, {task: main metric})`` in percent over the covered tasks (missing tasks are absent)."""
    tasks = {key: 100.0 * entry["main"] for key, entry in results["tasks"].items() if entry.get("main") is not None}
    mean = results["aggregates"].get("mean_main")
    return (None if mean is None else 100.0 * mean), tasks


def mlflow_figures(suite: str, mean: float | None, tasks: Mapping[str, float]) -> dict[str, float]:
    """``zeroshot/<suite>/<task>`` and ``zeroshot/<suite>/mean``, names made MLflow-safe as the runner's."""
    metrics = {metric_name(f"zeroshot/{suite}/{key}"): value for key, value in tasks.items()}
    if mean is not None:
        metrics[metric_name(f"zeroshot/{suite}/mean")] = mean
    return metrics

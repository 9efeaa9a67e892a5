"""Zero-shot classification and retrieval on local eval sets in clip_benchmark's webdataset layout.

The heavy lifting is clip_benchmark's: ``build_dataset("wds/<name>", root=task_dir)`` reads the set,
``zero_shot_classifier`` / ``run_classification`` produce the logits, and
``zeroshot_retrieval.evaluate`` the recalls. Classification *metrics* are computed here, from the
logits, because clip_benchmark 1.6.2's ``accuracy`` fails on numpy >= 2.4 (``float()`` of a 1-D
array); the definitions are DataComp's ``wds_eval.py``: acc1, acc5 (only with at least 5 classes),
and mean per-class recall = scikit-learn's ``balanced_accuracy_score``. The DataComp main metrics
of the WILDS / fairness sets (macro F1, worst-group accuracies) are re-implemented as small pure
functions with WILDS' definitions, so they need neither ``wilds`` nor ``torch_scatter``.

The model is any object with ``encode_image`` and ``encode_text`` (open_clip's CLIP, or a
hand-built one in the tests); ``device`` is a string because clip_benchmark passes it to
``torch.autocast``. Evaluation runs in fp32 (``amp=False``), as DataComp evaluates.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification as zsc
from clip_benchmark.metrics import zeroshot_retrieval as zsr
from sklearn.metrics import balanced_accuracy_score, f1_score

from amorlip.data import count_tar_images

log = logging.getLogger(__name__)

RECALL_K = (1, 5, 10)
# DataComp main metrics computed from the per-sample metadata (.npy): metric -> (metadata column that
# defines the groups, top-k). Column 0 is GeoDE's region, Dollar Street's income bucket and FMoW's
# region (DataComp's evaluators' `_metadata_fields`). DataComp's FMoW evaluator means to skip an
# "Other" region, but without a metadata map its group names are numbers, so every region counts;
# so it does here.
GROUP_METRICS = {"acc_wg": (0, 1), "acc_top5_wg": (0, 5), "acc_worst_region": (0, 1)}
EXTRA_METRICS = ("F1-macro_all", *GROUP_METRICS)


# --------------------------------------------------------------------------- pure metric functions


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (omitted with fewer than 5 classes) and mean per-class recall, as fractions.

    ``logits``: (N, C) scores; ``targets``: (N,) class indices. Top-1 uses ``argmax`` (ties go to the
    lowest class index, so a constant classifier scores exactly the share of class 0).
    """
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    n = len(targets)
    # counts / n in Python floats: exact fractions, not float32 means
    metrics = {"acc1": (pred == targets).sum().item() / n}
    if num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["acc5"] = (top5 == targets[:, None]).any(dim=1).sum().item() / n
    metrics["mean_per_class_recall"] = float(balanced_accuracy_score(targets.numpy(), pred.numpy()))
    return metrics


def macro_f1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """WILDS' ``F1(average="macro")`` (DataComp's iWildCam main metric ``F1-macro_all``): the macro
    F1 over the classes present in ``targets``."""
    pred = logits.argmax(dim=1).cpu().numpy()
    true = targets.cpu().numpy()
    return float(f1_score(true, pred, average="macro", labels=np.unique(true)))


def worst_group_accuracy(logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, k: int = 1) -> float:
    """The lowest top-``k`` accuracy over the non-empty groups (WILDS ``standard_group_eval``'s
    ``*_wg`` field; DataComp's GeoDE ``acc_wg``, Dollar Street ``acc_top5_wg`` and FMoW
    ``acc_worst_region``)."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices.cpu()
    correct = (topk == targets.cpu()[:, None]).any(dim=1)
    groups = groups.cpu().long()
    return min(correct[groups == g].sum().item() / (groups == g).sum().item() for g in torch.unique(groups))


def chance_level(metric: str, num_classes: int | None = None, num_samples: int | None = None) -> float | None:
    """What a classifier that ignores the image scores in expectation (None when it depends on the data).

    Top-1 accuracy and mean per-class recall: 1/C; top-5: min(1, 5/C); retrieval recall@1: 1/N for N
    images (for text retrieval each image's captions are 1/N of the texts when caption counts match).
    """
    if metric in ("acc1", "mean_per_class_recall") and num_classes:
        return 1.0 / num_classes
    if metric == "acc5" and num_classes:
        return min(1.0, 5.0 / num_classes)
    if metric in ("mean_recall@1", "image_retrieval_recall@1", "text_retrieval_recall@1") and num_samples:
        return 1.0 / num_samples
    return None


# --------------------------------------------------------------------------- reading eval sets


def shard_paths(task_dir: str | Path, split: str = "test") -> list[Path]:
    """The ``{split}/{0..n-1}.tar`` shards that ``{split}/nshards.txt`` announces."""
    split_dir = Path(task_dir) / split
    nshards = int((split_dir / "nshards.txt").read_text().strip())
    return [split_dir / f"{i}.tar" for i in range(nshards)]


def _iter_samples(task_dir: str | Path, wanted: tuple[str, ...]):
    """(key, {ext: bytes}) per sample, in shard order; only the extensions in ``wanted``."""
    for shard in shard_paths(task_dir):
        current, fields = None, {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                if key != current:
                    if current is not None:
                        yield current, fields
                    current, fields = key, {}
                if ext in wanted:
                    fields[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current, fields


def count_samples(task_dir: str | Path) -> int:
    """Number of images in a set (read from the tar headers; no decoding)."""
    return sum(count_tar_images(shard) for shard in shard_paths(task_dir))


def read_metadata(task_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and per-sample metadata rows (N, F) of a WILDS / fairness set (``cls`` + ``npy``)."""
    labels, rows = [], []
    for key, fields in _iter_samples(task_dir, ("cls", "npy")):
        if "npy" not in fields:
            raise ValueError(f"{task_dir}: sample {key} has no .npy metadata (needed for group metrics)")
        labels.append(int(fields["cls"].decode().strip()))
        rows.append(np.asarray(np.load(io.BytesIO(fields["npy"]))).reshape(-1))
    return torch.tensor(labels), torch.from_numpy(np.stack(rows)).long()


def _dataset(task_dir: str | Path, transform: Callable, task: str):
    name = Path(task_dir).name
    return build_dataset(f"wds/{name}", root=str(task_dir), transform=transform, split="test",
                         download=False, task=task)


# --------------------------------------------------------------------------- evaluation


def classify(model, tokenizer, task_dir: str | Path, transform: Callable, device: str = "cpu",
             batch_size: int = 64, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Zero-shot logits (N, C), targets (N,) and class names of one classification set.

    The class embeddings average the set's own templates (``zeroshot_classification_templates.txt``).
    With ``workers=0`` the rows come in shard order (what :func:`read_metadata` assumes).
    """
    dataset = _dataset(task_dir, transform, "zeroshot_classification")
    classnames, templates = dataset.classes, dataset.templates
    if not classnames or not templates:
        raise ValueError(f"{task_dir}: classnames.txt and zeroshot_classification_templates.txt are required")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    with torch.no_grad():
        classifier = zsc.zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=False)
        logits, targets = zsc.run_classification(model, classifier, loader, device, amp=False)
    return logits, targets, list(classnames)


def evaluate_classification(model, tokenizer, task_dir: str | Path, transform: Callable, device: str = "cpu",
                            batch_size: int = 64, workers: int = 0,
                            extra_metric: str | None = None) -> dict[str, float]:
    """acc1 / acc5 / mean_per_class_recall of one set, plus ``num_classes`` and ``num_samples``.

    ``extra_metric`` (one of :data:`EXTRA_METRICS`) adds a DataComp WILDS / fairness main metric;
    the group metrics read the metadata in shard order, so they force ``workers=0`` and check that
    the labels line up with the classification pass.
    """
    if extra_metric is not None and extra_metric not in EXTRA_METRICS:
        raise ValueError(f"unknown extra metric {extra_metric!r} (known: {', '.join(EXTRA_METRICS)})")
    if extra_metric in GROUP_METRICS:
        workers = 0
    logits, targets, classnames = classify(model, tokenizer, task_dir, transform, device, batch_size, workers)
    metrics = classification_metrics(logits, targets)
    if extra_metric == "F1-macro_all":
        metrics[extra_metric] = macro_f1(logits, targets)
    elif extra_metric in GROUP_METRICS:
        column, k = GROUP_METRICS[extra_metric]
        labels, metadata = read_metadata(task_dir)
        if not torch.equal(labels, targets.cpu().long()):
            raise ValueError(f"{task_dir}: metadata labels do not line up with the classification pass")
        metrics[extra_metric] = worst_group_accuracy(logits, targets, metadata[:, column], k=k)
    return {**metrics, "num_classes": len(classnames), "num_samples": len(targets)}


def evaluate_retrieval(model, tokenizer, task_dir: str | Path, transform: Callable, device: str = "cpu",
                       batch_size: int = 64, workers: int = 0) -> dict[str, float]:
    """Image and text recall@1/5/10 and ``mean_recall@1`` (DataComp's retrieval main metric).

    Recall@k is only reported for k up to the number of images (``topk`` needs k <= N).
    """
    num_images = count_samples(task_dir)
    if num_images == 0:
        raise ValueError(f"{task_dir}: the retrieval set has no images")
    dataset = _dataset(task_dir, transform, "zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=image_captions_collate_fn)
    ks = [k for k in RECALL_K if k <= num_images]
    metrics = zsr.evaluate(model, loader, tokenizer, device, amp=False, recall_k_list=ks)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
    metrics["num_samples"] = num_images
    if any(math.isnan(v) for v in metrics.values()):
        log.warning("%s: NaN in retrieval metrics %s", task_dir, metrics)
    return metrics

"""Evaluation suites: which tasks, where their data lives, each task's main metric and group.

A suite is data, not code: the runner evaluates whatever tasks a suite lists and aggregates their
main metrics by group. Two suites exist:

- ``emoji-heldout``: the offline demo's held-out-style tasks, read from
  ``<data>/evalsets/emoji-heldout/tasks.json`` (docs/architecture.md, "Eval-set layout").
- ``datacomp``: the 38 DataComp tasks (mlfoundations/datacomp ``tasklist.yml``) with DataComp's main
  metrics and the groups of its ``aggregate_scores.py`` (ImageNet-1k, ImageNet dist. shifts (6),
  VTAB (13), Retrieval (3)); the suite mean is the unweighted mean over the 38 main metrics, the
  number the AmorLIP paper reports as "Avg 38". FairFace and UTKFace are listed without a main
  metric, as in DataComp, and never enter an average. Task folders are named as DataComp's
  ``download_evalsets.py`` names them: ``wds_<key with / replaced by ->_test`` under the DataComp
  root, with the ``fairness/`` prefix dropped (WinoGAViL, which DataComp reads through HF
  ``datasets``, gets ``wds_misc-winogavil_test`` by the same rule).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUITE_NAMES = ("emoji-heldout", "datacomp")

# Main metrics whose chance level follows from the class or sample count alone.
COUNT_CHANCE_METRICS = ("acc1", "mean_per_class_recall", "mean_recall@1")


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation task of a suite.

    ``metadata_metric`` names a DataComp main metric that needs the per-sample metadata (``.npy``) of
    the WILDS / fairness sets (worst-group accuracies, macro F1). ``unsupported`` says why a task
    cannot be evaluated by this project (it is then reported as missing, never as zero).
    ``source`` is the Hugging Face dataset repo the downloader fetches the folder from.
    """

    key: str
    name: str
    type: str  # "classification" | "retrieval" | "winogavil"
    main_metric: str | None
    group: str | None
    path: Path
    num_classes: int | None = None
    source: str | None = None
    unsupported: str | None = None

    @property
    def in_average(self) -> bool:
        return self.main_metric is not None


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[Task, ...]
    # group name -> task keys, in display order (DataComp's aggregate groups; the demo's categories)
    groups: Mapping[str, tuple[str, ...]]

    @property
    def scored_tasks(self) -> tuple[Task, ...]:
        """Tasks with a main metric: the denominator of the suite mean ("total")."""
        return tuple(t for t in self.tasks if t.in_average)

    def task(self, key: str) -> Task:
        for t in self.tasks:
            if t.key == key:
                return t
        raise KeyError(f"suite '{self.name}' has no task '{key}' (tasks: {', '.join(t.key for t in self.tasks)})")


# --------------------------------------------------------------------------- datacomp

IMAGENET = "ImageNet-1k"
SHIFTS = "ImageNet dist. shifts"
VTAB = "VTAB"
RETRIEVAL = "Retrieval"

# (key, display name as in DataComp's tasklist.yml, main metric (None = DataComp lists none), group,
#  number of classes). Order and names follow tasklist.yml; groups follow aggregate_scores.py.
DATACOMP_TASKS: tuple[tuple[str, str, str | None, str | None, int | None], ...] = (
    ("vtab/caltech101", "Caltech-101", "mean_per_class_recall", VTAB, 102),
    ("cifar10", "CIFAR-10", "acc1", None, 10),
    ("vtab/cifar100", "CIFAR-100", "acc1", VTAB, 100),
    ("vtab/clevr_count_all", "CLEVR Counts", "acc1", VTAB, 8),
    ("vtab/clevr_closest_object_distance", "CLEVR Distance", "acc1", VTAB, 6),
    ("country211", "Country211", "acc1", None, 211),
    ("vtab/dtd", "Describable Textures", "acc1", VTAB, 47),
    ("vtab/eurosat", "EuroSAT", "acc1", VTAB, 10),
    ("fgvc_aircraft", "FGVC Aircraft", "mean_per_class_recall", None, 100),
    ("food101", "Food-101", "acc1", None, 101),
    ("gtsrb", "GTSRB", "acc1", None, 43),
    ("imagenet1k", "ImageNet 1k", "acc1", IMAGENET, 1000),
    ("imagenet_sketch", "ImageNet Sketch", "acc1", SHIFTS, 1000),
    ("imagenetv2", "ImageNet v2", "acc1", SHIFTS, 1000),
    ("imagenet-a", "ImageNet-A", "acc1", SHIFTS, 200),
    ("imagenet-o", "ImageNet-O", "acc1", SHIFTS, 200),
    ("imagenet-r", "ImageNet-R", "acc1", SHIFTS, 200),
    ("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", "acc1", VTAB, 4),
    ("mnist", "MNIST", "acc1", None, 10),
    ("objectnet", "ObjectNet", "acc1", SHIFTS, 113),
    ("vtab/flowers", "Oxford Flowers-102", "mean_per_class_recall", VTAB, 102),
    ("vtab/pets", "Oxford-IIIT Pet", "mean_per_class_recall", VTAB, 37),
    ("voc2007", "Pascal VOC 2007", "acc1", None, 20),
    ("vtab/pcam", "PatchCamelyon", "acc1", VTAB, 2),
    ("renderedsst2", "Rendered SST2", "acc1", None, 2),
    ("vtab/resisc45", "RESISC45", "acc1", VTAB, 45),
    ("cars", "Stanford Cars", "acc1", None, 196),
    ("stl10", "STL-10", "acc1", None, 10),
    ("sun397", "SUN397", "acc1", VTAB, 397),
    ("vtab/svhn", "SVHN", "acc1", VTAB, 10),
    ("retrieval/flickr30k", "Flickr", "mean_recall@1", RETRIEVAL, None),
    ("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1", RETRIEVAL, None),
    ("misc/winogavil", "WinoGAViL", "jaccard_score_10-12", RETRIEVAL, None),
    ("wilds/iwildcam", "iWildCam", "F1-macro_all", None, 182),
    ("wilds/camelyon17", "Camelyon17", "acc1", None, 2),
    ("wilds/fmow", "FMoW", "acc_worst_region", None, 62),
    ("fairness/dollar_street", "Dollar Street", "acc_top5_wg", None, 58),
    ("fairness/geode", "GeoDE", "acc_wg", None, 40),
    ("fairness/fairface", "FairFace", None, None, None),
    ("fairness/utkface", "UTKFace", None, None, None),
)

# DataComp reads Flickr and MSCOCO through HF `datasets` (nlphuji/*); the same Karpathy test splits
# (1k Flickr30k, 5k MSCOCO 2014) exist in clip_benchmark's webdataset layout, which keeps this
# project's evaluation fully offline once downloaded.
RETRIEVAL_SOURCES = {
    "retrieval/flickr30k": "clip-benchmark/wds_flickr30k",
    "retrieval/mscoco_2014_5k_test_image_text_retrieval": "clip-benchmark/wds_mscoco_captions",
}

# WinoGAViL: the two plain files of DataComp's HF dataset repo (amorlip/evaluate/winogavil.py)
OTHER_SOURCES = {**RETRIEVAL_SOURCES, "misc/winogavil": "nlphuji/winogavil"}

UNSUPPORTED = {
    "fairness/fairface": "no main metric in DataComp (fairness analysis only; excluded from the average)",
    "fairness/utkface": "no main metric in DataComp (fairness analysis only; excluded from the average)",
}


def datacomp_folder_name(key: str) -> str:
    """``wds_<task>_test`` as DataComp's download_evalsets.py names the folder of ``key``."""
    if key.startswith("fairness/"):
        key = key.split("/", 1)[1]
    return f"wds_{key.replace('/', '-')}_test"


def _task_type(key: str) -> str:
    if key.startswith("retrieval/"):
        return "retrieval"
    if key == "misc/winogavil":
        return "winogavil"
    return "classification"


def datacomp_suite(root: str | Path) -> Suite:
    """The DataComp 38-task suite (+ FairFace/UTKFace, unscored) with its folders under ``root``."""
    root = Path(root)
    tasks = []
    for key, name, metric, group, num_classes in DATACOMP_TASKS:
        tasks.append(Task(
            key=key, name=name,
            type=_task_type(key),
            main_metric=metric, group=group, path=root / datacomp_folder_name(key),
            num_classes=num_classes,
            source=OTHER_SOURCES.get(key, f"djghosh/{datacomp_folder_name(key)}"),
            unsupported=UNSUPPORTED.get(key),
        ))
    groups = {g: tuple(t.key for t in tasks if t.group == g) for g in (IMAGENET, SHIFTS, VTAB, RETRIEVAL)}
    return Suite(name="datacomp", tasks=tuple(tasks), groups=groups)


# --------------------------------------------------------------------------- tasks.json suites


def load_tasks_json(path: str | Path, name: str | None = None) -> Suite:
    """A suite described by a ``tasks.json`` (the demo's held-out-style eval sets)."""
    path = Path(path)
    with open(path) as fh:
        spec: dict[str, Any] = json.load(fh)
    tasks = []
    for entry in spec["tasks"]:
        tasks.append(Task(
            key=entry["key"], name=entry.get("name", entry["key"]), type=entry["type"],
            main_metric=entry.get("main_metric") or ("acc1" if entry["type"] == "classification" else "mean_recall@1"),
            group=entry.get("group"), path=(path.parent / entry["path"]).resolve(),
            num_classes=entry.get("num_classes"),
        ))
    groups: dict[str, tuple[str, ...]] = {}
    for t in tasks:
        if t.group:
            groups[t.group] = groups.get(t.group, ()) + (t.key,)
    return Suite(name=name or spec.get("suite") or path.parent.name, tasks=tuple(tasks), groups=groups)


def emoji_heldout_tasks_json(data_root: str | Path) -> Path:
    """Where the demo's held-out eval sets describe themselves: ``<data>/evalsets/emoji-heldout/tasks.json``.

    The one definition of that path: the Snakemake rule ``emoji_evalsets`` declares it as its output
    (the builder writes it last, so it marks a complete build) and :func:`get_suite` reads it.
    """
    return Path(data_root) / "evalsets" / "emoji-heldout" / "tasks.json"


def get_suite(config: Mapping[str, Any], name: str) -> Suite:
    """Resolve a suite name of ``evaluation.suites`` to its tasks and folders."""
    if name == "datacomp":
        return datacomp_suite(config["evaluation"]["datacomp_root"])
    if name == "emoji-heldout":
        tasks_json = emoji_heldout_tasks_json(config["paths"]["data"])
        if not tasks_json.exists():
            raise FileNotFoundError(
                f"{tasks_json} not found: build the demo's eval sets first "
                "(snakemake ... evalsets, or `amorlip evalsets build-emoji`)"
            )
        return load_tasks_json(tasks_json, name=name)
    raise ValueError(f"unknown suite '{name}' (known: {', '.join(SUITE_NAMES)})")

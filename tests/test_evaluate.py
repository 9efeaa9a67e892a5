"""Zero-shot evaluation: exact numbers from a model whose embeddings are known by construction.

The eval sets are real webdataset shards in clip_benchmark's local layout (and, for the DataComp
suite, DataComp's folder names), read by clip_benchmark's own loader. The "model" encodes an image
(a solid colour whose red level is the class index) and a text (tokenized to the class it names)
into one-hot class embeddings, so every metric has an exact expected value: 100% for the faithful
encoder, exactly chance for a constant one, exactly 0 for a shifted one.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image

from amorlip.evaluate import runner, suites, zeroshot

NAMES = ["apple", "banana", "cherry", "damson", "elder", "fig"]
TEMPLATES = ["a photo of a {c}.", "an icon of the {c}"]


# --------------------------------------------------------------------------- a model with known embeddings


def colour_image(cls: int, green: bool = False) -> Image.Image:
    """Class ``cls`` as a solid colour: red = 20*cls + 10 (green marks a second group)."""
    return Image.new("RGB", (8, 8), (20 * cls + 10, 255 if green else 0, 0))


TRANSFORM = T.ToTensor()  # keeps the red level exact (no resize, no normalisation)


class ClassTokenizer:
    """Tokenizes a text to the index of the class name it contains (one token per text)."""

    def __init__(self, names):
        self.names = list(names)

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        ids = []
        for text in texts:
            hits = [i for i, n in enumerate(self.names) if re.search(rf"\b{n}\b", text)]
            assert len(hits) == 1, text
            ids.append(hits)
        return torch.tensor(ids)


class KnownModel(torch.nn.Module):
    """encode_image / encode_text -> one-hot class embeddings.

    mode "faithful": the image's class; "shifted": class + 1 (always wrong); "constant": the same
    vector for every image (no information); "green-blind": faithful, but shifted on green images.
    """

    def __init__(self, dim: int, mode: str = "faithful"):
        super().__init__()
        self.dim, self.mode = dim, mode

    def image_class(self, images):
        return torch.round((images[:, 0].mean(dim=(1, 2)) * 255 - 10) / 20).long()

    def encode_image(self, images):
        if self.mode == "constant":
            return torch.ones(len(images), self.dim)
        cls = self.image_class(images)
        if self.mode == "shifted":
            cls = (cls + 1) % self.dim
        elif self.mode == "green-blind":
            green = images[:, 1].mean(dim=(1, 2)) > 0.5
            cls = torch.where(green, (cls + 1) % self.dim, cls)
        return torch.nn.functional.one_hot(cls, self.dim).float()

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens[:, 0].long(), self.dim).float()


# --------------------------------------------------------------------------- eval sets in clip_benchmark's layout


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_classification_set(folder: Path, labels, names=NAMES, groups=None, shards: int = 1) -> Path:
    """``test/{i}.tar`` + nshards, classnames, templates; ``groups`` adds DataComp-style ``.npy`` metadata."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    per = -(-len(labels) // shards)
    for s in range(shards):
        with wds.TarWriter(str(folder / "test" / f"{s}.tar")) as sink:
            for i in range(s * per, min(len(labels), (s + 1) * per)):
                g = None if groups is None else groups[i]
                sample = {"__key__": f"s{i:05d}", "png": _png(colour_image(labels[i], green=bool(g))),
                          "cls": str(labels[i]).encode()}
                if groups is not None:
                    buf = io.BytesIO()
                    np.save(buf, np.array([g, 7], dtype=np.int64))
                    sample["npy"] = buf.getvalue()
                sink.write(sample)
    return folder


def write_retrieval_set(folder: Path, n: int) -> Path:
    """``n`` images (class i each) with two captions naming their class."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    (folder / "test" / "nshards.txt").write_text("1\n")
    with wds.TarWriter(str(folder / "test" / "0.tar")) as sink:
        for i in range(n):
            captions = f"a drawing of a {NAMES[i]}\n{NAMES[i]} on a plain background"
            sink.write({"__key__": f"r{i:05d}", "png": _png(colour_image(i)), "txt": captions.encode()})
    return folder


BALANCED = [c for c in range(6) for _ in range(3)]  # 18 images, 3 per class


# --------------------------------------------------------------------------- pure metric functions


def test_classification_metrics_by_hand():
    logits = torch.tensor([[3.0, 2, 1, 0, 0, 0], [0, 3.0, 2, 1, 0, 0], [5.0, 4, 3, 2, 1, 0], [0, 0, 0, 0, 1, 2.0]])
    targets = torch.tensor([0, 2, 5, 5])
    m = zeroshot.classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(0.5)   # rows 0 and 3
    assert m["acc5"] == pytest.approx(0.75)  # row 2's class 5 is ranked last of 6
    # per-class recall: class 0 -> 1, class 2 -> 0, class 5 -> 1/2
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_acc5_is_omitted_below_five_classes():
    m = zeroshot.classification_metrics(torch.eye(4), torch.arange(4))
    assert "acc5" not in m and m["acc1"] == 1.0


def test_worst_group_accuracy_and_macro_f1():
    logits = torch.eye(3)[[0, 1, 2, 0, 0, 1]]  # predictions 0 1 2 0 0 1
    targets = torch.tensor([0, 1, 2, 1, 2, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert zeroshot.worst_group_accuracy(logits, targets, groups) == pytest.approx(1 / 3)
    assert zeroshot.worst_group_accuracy(logits, targets, groups, k=3) == 1.0
    # F1 per class: class0 p=1/3 r=1 -> 0.5; class1 p=1 r=2/3 -> 0.8; class2 p=1 r=1/2 -> 2/3
    assert zeroshot.macro_f1(logits, targets) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_chance_levels():
    assert zeroshot.chance_level("acc1", num_classes=8) == 0.125
    assert zeroshot.chance_level("mean_per_class_recall", num_classes=4) == 0.25
    assert zeroshot.chance_level("acc5", num_classes=4) == 1.0
    assert zeroshot.chance_level("mean_recall@1", num_samples=50) == 0.02
    assert zeroshot.chance_level("acc_wg", num_classes=8) is None


# --------------------------------------------------------------------------- classification and retrieval


@pytest.fixture(scope="module")
def cls_set(tmp_path_factory):
    return write_classification_set(tmp_path_factory.mktemp("cls") / "wds_fruit_test", BALANCED, shards=2)


def test_faithful_model_scores_100_percent(cls_set):
    m = zeroshot.evaluate_classification(KnownModel(6), ClassTokenizer(NAMES), cls_set, TRANSFORM, batch_size=4)
    assert m == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0, "num_classes": 6, "num_samples": 18}


def test_constant_model_scores_exactly_chance(cls_set):
    m = zeroshot.evaluate_classification(KnownModel(6, "constant"), ClassTokenizer(NAMES), cls_set, TRANSFORM)
    chance = zeroshot.chance_level("acc1", num_classes=m["num_classes"])
    assert chance == pytest.approx(1 / 6)
    assert m["acc1"] == pytest.approx(chance, abs=1e-12)
    assert m["mean_per_class_recall"] == pytest.approx(chance, abs=1e-12)


def test_shifted_model_scores_zero(cls_set):
    m = zeroshot.evaluate_classification(KnownModel(6, "shifted"), ClassTokenizer(NAMES), cls_set, TRANSFORM)
    assert m["acc1"] == 0.0 and m["mean_per_class_recall"] == 0.0


def test_retrieval_recall(tmp_path):
    folder = write_retrieval_set(tmp_path / "wds_pairs_test", n=6)
    m = zeroshot.evaluate_retrieval(KnownModel(6), ClassTokenizer(NAMES), folder, TRANSFORM, batch_size=4)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5",
                "text_retrieval_recall@5", "mean_recall@1"):
        assert m[key] == 1.0, key
    assert "image_retrieval_recall@10" not in m  # only 6 images: k=10 is undefined
    assert m["num_samples"] == 6
    shifted = zeroshot.evaluate_retrieval(KnownModel(6, "shifted"), ClassTokenizer(NAMES), folder, TRANSFORM)
    assert shifted["mean_recall@1"] == 0.0


# --------------------------------------------------------------------------- suites and the runner


def test_datacomp_suite_definition():
    s = suites.datacomp_suite("/dc")
    assert len(s.scored_tasks) == 38 and len(s.tasks) == 40
    assert {g: len(k) for g, k in s.groups.items()} == {
        "ImageNet-1k": 1, "ImageNet dist. shifts": 6, "VTAB": 13, "Retrieval": 3}
    assert s.task("vtab/caltech101").main_metric == "mean_per_class_recall"
    assert s.task("retrieval/flickr30k").main_metric == "mean_recall@1"
    assert s.task("wilds/fmow").main_metric == "acc_worst_region"
    assert s.task("fairness/fairface").main_metric is None
    # DataComp's download_evalsets.py folder names
    assert s.task("vtab/caltech101").path == Path("/dc/wds_vtab-caltech101_test")
    assert s.task("fairness/geode").path == Path("/dc/wds_geode_test")
    assert s.task("wilds/iwildcam").path == Path("/dc/wds_wilds-iwildcam_test")


@pytest.fixture(scope="module")
def partial_datacomp(tmp_path_factory):
    """Four DataComp tasks present, one incomplete, the other 33 absent."""
    root = tmp_path_factory.mktemp("datacomp")
    name = suites.datacomp_folder_name
    write_classification_set(root / name("cifar10"), BALANCED)
    write_classification_set(root / name("vtab/caltech101"), [0, 0, 0, 0, 1, 2, 3, 4, 5])
    write_retrieval_set(root / name("retrieval/flickr30k"), n=6)
    # GeoDE: region (metadata column 0) 1 = green images, which the green-blind model gets wrong
    write_classification_set(root / name("fairness/geode"), BALANCED, groups=[i % 3 == 0 for i in range(18)])
    broken = write_classification_set(root / name("imagenet1k"), BALANCED)
    (broken / "test" / "nshards.txt").write_text("2\n")  # announces a shard that is not there
    return root


def test_datacomp_partial_coverage_never_counts_missing_as_zero(partial_datacomp):
    suite = suites.datacomp_suite(partial_datacomp)
    res = runner.evaluate_suite(KnownModel(6, "green-blind"), ClassTokenizer(NAMES), TRANSFORM, suite,
                                batch_size=8, run="r")
    tasks, agg = res["tasks"], res["aggregates"]
    assert tasks["cifar10"]["main"] == 1.0
    assert tasks["vtab/caltech101"]["main"] == 1.0  # mean per-class recall
    assert tasks["retrieval/flickr30k"]["main"] == 1.0
    geode = tasks["fairness/geode"]
    assert geode["main_metric"] == "acc_wg"
    assert geode["metrics"]["acc1"] == pytest.approx(12 / 18)
    assert geode["main"] == 0.0  # the worst region (green) is always wrong
    assert "shard" in tasks["imagenet1k"]["missing"] and "main" not in tasks["imagenet1k"]
    assert "not found" in tasks["misc/winogavil"]["missing"]
    assert "not found" in tasks["sun397"]["missing"]
    assert agg["covered"] == 4 and agg["total"] == 38
    assert agg["mean_main"] == pytest.approx(3 / 4)  # the mean of the 4 covered tasks, not of 38
    assert agg["groups"]["VTAB"] == 1.0 and agg["groups_covered"]["VTAB"] == {"covered": 1, "total": 13}
    assert agg["groups"]["ImageNet-1k"] is None and agg["groups"]["ImageNet dist. shifts"] is None
    assert agg["groups_covered"]["Retrieval"] == {"covered": 1, "total": 3}
    assert len(agg["missing"]) == 34 and "fairness/fairface" not in agg["missing"]
    assert res["chance"]["cifar10"] == pytest.approx(1 / 6)
    assert res["chance"]["retrieval/flickr30k"] == pytest.approx(1 / 6)
    assert res["chance"]["fairness/geode"] is None


def test_tasks_json_suite_and_mlflow_child(tmp_path, monkeypatch):
    """The demo layout (tasks.json) through the runner, results JSON/CSV and the MLflow child run."""
    from mlflow import MlflowClient

    from amorlip.config import load_config
    from amorlip.tracking import init_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, results = tmp_path / "data", tmp_path / "results"
    root = data / "evalsets" / "emoji-heldout"
    write_classification_set(root / "category", BALANCED)
    write_retrieval_set(root / "retrieval", n=6)
    (root / "tasks.json").write_text(json.dumps({"suite": "emoji-heldout", "tasks": [
        {"key": "category", "type": "classification", "path": "category", "main_metric": "acc1",
         "group": "classification", "num_classes": 6},
        {"key": "retrieval", "type": "retrieval", "path": "retrieval", "main_metric": "mean_recall@1",
         "group": "retrieval"},
    ]}))
    config = load_config({"paths": {"data": str(data), "results": str(results), "runs": str(tmp_path / "runs")}},
                         check_paths=False)
    init_pipeline(config, results / "mlflow_parent.json")
    out = results / "clip" / "emoji-heldout.json"
    res = runner.evaluate_loaded(config, "clip", "emoji-heldout", out, KnownModel(6), TRANSFORM,
                                 ClassTokenizer(NAMES), meta={"run": {"method": "clip", "variant": "none"}})
    on_disk = json.loads(out.read_text())
    assert on_disk["tasks"]["category"]["main"] == 1.0 and on_disk["aggregates"]["mean_main"] == 1.0
    assert on_disk["aggregates"]["groups"] == {"classification": 1.0, "retrieval": 1.0}
    assert on_disk["chance"] == {"category": pytest.approx(1 / 6), "retrieval": pytest.approx(1 / 6)}
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("task,name")

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    parent = json.loads((results / "mlflow_parent.json").read_text())["run_id"]
    child = client.get_run(res["mlflow_run_id"])
    assert child.info.run_name == "clip/emoji-heldout"
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["amorlip.kind"] == "evaluate"
    assert child.data.metrics["main/category"] == 1.0
    assert child.data.metrics["suite/mean_main"] == 1.0 and child.data.metrics["suite/covered"] == 2
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"emoji-heldout.json", "emoji-heldout.csv"}

    # `amorlip evaluate`'s path: a real exported open_clip model (random tiny towers) from model.pt
    from amorlip.model_file import FORMAT
    from amorlip.models import create_model, model_config

    model, _, _ = create_model("amorlip-tiny")
    (tmp_path / "runs" / "amorlip").mkdir(parents=True)
    torch.save({"format": FORMAT, "model_name": "amorlip-tiny", "model_config": model_config("amorlip-tiny"),
                "model_kwargs": {}, "state_dict": model.state_dict(), "run": {"method": "amorlip"},
                "lambda_nets": None, "step": 3}, tmp_path / "runs" / "amorlip" / "model.pt")
    res = runner.evaluate(config, "amorlip", "emoji-heldout", results / "amorlip" / "emoji-heldout.json")
    assert res["aggregates"]["covered"] == 2 and 0.0 <= res["aggregates"]["mean_main"] <= 1.0
    assert res["model"]["step"] == 3
    assert client.get_run(res["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent


def test_eval_results_land_on_the_training_run(tmp_path, monkeypatch):
    """Zero-shot results (percent) on the training run, so one runs table sorts accuracy against lr;
    the evaluation child run names its training run by id."""
    from mlflow import MlflowClient

    from amorlip.config import load_config
    from amorlip.tracking import child_run, init_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, results, runs = tmp_path / "data", tmp_path / "results", tmp_path / "runs"
    root = data / "evalsets" / "emoji-heldout"
    write_classification_set(root / "category", BALANCED)
    (root / "tasks.json").write_text(json.dumps({"suite": "emoji-heldout", "tasks": [
        {"key": "category", "type": "classification", "path": "category", "main_metric": "acc1",
         "group": "classification", "num_classes": 6}]}))
    config = load_config({"paths": {"data": str(data), "results": str(results), "runs": str(runs)}},
                         check_paths=False)
    init_pipeline(config, results / "mlflow_parent.json")
    train_ids = {}
    for name, lr, model in (("good", 1e-3, KnownModel(6)), ("bad", 1e-1, KnownModel(6, "shifted"))):
        with child_run(config, name, "train") as tracker:
            tracker.log_params({"lr": lr})
        train_ids[name] = tracker.run_id
        (runs / name).mkdir(parents=True)
        (runs / name / "train.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
        res = runner.evaluate_loaded(config, name, "emoji-heldout", results / name / "emoji-heldout.json", model,
                                     TRANSFORM, ClassTokenizer(NAMES), meta={"step": 7})
        ev = MlflowClient(f"sqlite:///{results / 'mlflow.db'}").get_run(res["mlflow_run_id"])
        assert ev.data.tags["amorlip.train_run_id"] == tracker.run_id

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    good = client.get_run(train_ids["good"])
    assert good.info.status == "FINISHED"  # logging onto it did not reopen it
    assert good.data.metrics["eval/emoji-heldout/mean_main"] == 100.0
    assert good.data.metrics["eval/emoji-heldout/category"] == 100.0
    assert good.data.metrics["eval/emoji-heldout/group/classification"] == 100.0
    assert good.data.metrics["eval/emoji-heldout/chance_mean_main"] == pytest.approx(100 / 6)
    assert [m.step for m in client.get_metric_history(train_ids["good"], "eval/emoji-heldout/mean_main")] == [7]
    assert client.get_run(train_ids["bad"]).data.metrics["eval/emoji-heldout/mean_main"] == 0.0
    # one query over the training runs: accuracy sorted, with lr beside it
    table = client.search_runs([good.info.experiment_id], "tags.`amorlip.kind` = 'train'",
                               order_by=["metrics.`eval/emoji-heldout/mean_main` DESC"])
    assert [(r.data.params["lr"], r.data.metrics["eval/emoji-heldout/mean_main"]) for r in table] == [
        ("0.001", 100.0), ("0.1", 0.0)]
    # the training run points at its evaluation run too
    assert good.data.tags["amorlip.eval_run_id.emoji-heldout"] != train_ids["good"]


# DataComp downloads (huggingface_hub against a loopback hub): tests/test_datacomp_download.py

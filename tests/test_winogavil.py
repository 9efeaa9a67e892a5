"""WinoGAViL (DataComp's ``misc/winogavil``) on synthetic sets in the real on-disk format.

The set is what ``nlphuji/winogavil`` holds: ``winogavil_dataset.csv`` (one game per row, candidates
and associations as JSON lists) and ``winogavil_images.zip`` (``winogavil_images/<name>.jpg``).
Scores are checked against games whose answer is known by construction (the one-hot model of
test_evaluate.py) and against an independent re-derivation for a real tiny open_clip model: each
game embedded on its own as DataComp's loop does, scikit-learn's ``jaccard_score``, numpy group means.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import jaccard_score
from test_evaluate import NAMES, TRANSFORM, ClassTokenizer, KnownModel, colour_image

from amorlip.evaluate import runner, suites, winogavil

CSV_COLUMNS = ["candidates", "cue", "associations", "score_fool_the_ai", "num_associations", "annotation_index",
               "num_candidates", "solvers_jaccard_mean", "solvers_jaccard_std", "ID"]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_winogavil_set(folder: Path, games, images: dict[str, Image.Image]) -> Path:
    """``games``: (cue, candidates, associations) triples; ``images``: name -> image (stored as JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / winogavil.CSV_NAME, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for i, (cue, candidates, associations) in enumerate(games):
            writer.writerow([json.dumps(candidates), cue, json.dumps(associations), 0.0, len(associations), i,
                             len(candidates), 90.0, 5.0, 1000 + i])
    with zipfile.ZipFile(folder / winogavil.ZIP_NAME, "w") as zf:
        for name, img in images.items():
            zf.writestr(f"winogavil_images/{name}.jpg", _jpeg(img))
    return folder


# --------------------------------------------------------------------------- games with known answers

# image name -> class (its colour, see test_evaluate.colour_image); the cue names a class
POOL = {"apple1": 0, "apple2": 0, "banana1": 1, "banana2": 1, "cherry1": 2, "cherry2": 2, "cherry3": 2,
        "damson1": 3, "elder1": 4, "fig1": 5, "fig2": 5, "elder2": 4}
ALL12 = list(POOL)
KNOWN_GAMES = [
    # 5 candidates: both apples are the associations and the only apple images -> 1
    ("Apple", ["apple1", "apple2", "banana1", "cherry1", "damson1"], ["apple1", "apple2"]),
    # 6: picks the two bananas; truth banana1 + cherry1 -> 1/3
    ("banana", ["apple1", "banana1", "banana2", "cherry1", "damson1", "elder1"], ["banana1", "cherry1"]),
    # 10: picks the three cherries; truth cherry1, cherry2, apple1 -> 2/4
    ("cherry", ["cherry1", "cherry2", "cherry3", "apple1", "apple2", "banana1", "banana2", "damson1", "elder1",
                "fig1"], ["cherry1", "cherry2", "apple1"]),
    # 12: the two figs -> 1
    ("Fig", ALL12, ["fig1", "fig2"]),
    # 12: picks damson1, truth apple1 -> 0
    ("damson", ALL12, ["apple1"]),
]
KNOWN = {"jaccard_score_5": 1.0, "jaccard_score_6": 1 / 3, "jaccard_score_10": 0.5, "jaccard_score_12": 0.5,
         "jaccard_score_5-6": 2 / 3, "jaccard_score_10-12": 0.5, "avg_jaccard_score": (1 + 1 / 3 + 0.5 + 1 + 0) / 5}


@pytest.fixture(scope="module")
def known_set(tmp_path_factory):
    return write_winogavil_set(tmp_path_factory.mktemp("wino") / "wds_misc-winogavil_test", KNOWN_GAMES,
                               {name: colour_image(cls) for name, cls in POOL.items()})


def test_prompt_is_datacomps():
    assert [winogavil.clip_prompt(c) for c in ("Apple", "banana", "Elder", "UFO", "owl")] == [
        "An apple", "A banana", "An elder", "An ufo", "An owl"]


def test_random_jaccard_matches_enumeration():
    # by hand, n=10, k=3: overlaps 1, 2, 3 with probabilities 63/120, 21/120, 1/120
    assert winogavil.random_jaccard(10, 3) == pytest.approx(63 / 120 * 1 / 5 + 21 / 120 * 2 / 4 + 1 / 120)
    for n, k in ((5, 2), (6, 3), (10, 4), (12, 1), (12, 5)):
        truth = set(range(k))
        picks = list(itertools.combinations(range(n), k))
        brute = sum(len(truth & set(p)) / len(truth | set(p)) for p in picks) / len(picks)
        assert winogavil.random_jaccard(n, k) == pytest.approx(brute, abs=1e-12), (n, k)


def test_known_games_score_exactly(known_set):
    games = winogavil.read_games(known_set)
    assert [g.id for g in games] == ["1000", "1001", "1002", "1003", "1004"]
    m = winogavil.evaluate_winogavil(KnownModel(6), ClassTokenizer(NAMES), known_set, TRANSFORM, batch_size=5)
    for key, value in KNOWN.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert m["num_samples"] == 5 and m["num_games_jaccard_score_10-12"] == 3
    chance = np.mean([winogavil.random_jaccard(10, 3), winogavil.random_jaccard(12, 2),
                      winogavil.random_jaccard(12, 1)])
    assert m["chance_jaccard_score_10-12"] == pytest.approx(chance, abs=1e-12)


def test_groups_without_games_are_left_out():
    m = winogavil.aggregate([1.0, 0.5], [5, 6], [0.3, 0.2])
    assert "jaccard_score_10-12" not in m and "jaccard_score_12" not in m
    assert m["jaccard_score_5-6"] == 0.75 and m["chance_jaccard_score_5-6"] == pytest.approx(0.25)


def test_datacomp_suite_covers_winogavil(known_set, tmp_path):
    root = tmp_path / "datacomp"
    root.mkdir()
    (root / suites.datacomp_folder_name("misc/winogavil")).symlink_to(known_set)
    suite = suites.datacomp_suite(root)
    task = suite.task("misc/winogavil")
    assert task.type == "winogavil" and task.source == "nlphuji/winogavil" and task.unsupported is None
    res = runner.evaluate_suite(KnownModel(6), ClassTokenizer(NAMES), TRANSFORM, suite, run="r")
    entry, agg = res["tasks"]["misc/winogavil"], res["aggregates"]
    assert entry["main_metric"] == "jaccard_score_10-12" and entry["main"] == pytest.approx(0.5)
    assert entry["chance"] == pytest.approx(entry["metrics"]["chance_jaccard_score_10-12"])
    assert agg["covered"] == 1 and agg["total"] == 38 and agg["mean_main"] == pytest.approx(0.5)
    assert agg["groups"]["Retrieval"] == pytest.approx(0.5)
    assert agg["groups_covered"]["Retrieval"] == {"covered": 1, "total": 3}
    assert agg["chance_mean_main"] == pytest.approx(entry["chance"])


# --------------------------------------------------------------------------- a real tiny model, re-derived


def test_tiny_open_clip_model_matches_a_per_game_rederivation(tmp_path):
    from amorlip.models import create_model, get_tokenizer

    torch.manual_seed(0)
    model, _, preprocess = create_model("amorlip-tiny")
    model.eval()
    tokenizer = get_tokenizer("amorlip-tiny")
    rng = np.random.default_rng(0)
    names = [f"img{i:02d}" for i in range(14)]
    # noise and solid colours: embeddings of unequal norms, so the normalisation matters to the ranking
    images = {n: Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) if i % 2 else
              Image.new("RGB", (40, 48), tuple(int(v) for v in rng.integers(0, 256, 3))) for i, n in enumerate(names)}
    cues = {"owl": "An owl", "Moon": "A moon", "ice": "An ice", "river": "A river", "Tiger": "A tiger",
            "Echo": "An echo"}
    games = []
    for cue in cues:
        for n in (5, 6, 10, 12):
            cands = list(rng.choice(names, size=n, replace=False))
            k = int(rng.integers(1, min(4, n - 1) + 1))
            games.append((cue, cands, list(rng.choice(cands, size=k, replace=False))))
    folder = write_winogavil_set(tmp_path / "wino", games, images)
    m = winogavil.evaluate_winogavil(model, tokenizer, folder, preprocess, batch_size=7)

    # independent: every game on its own, decoded from the zip as DataComp's loop gets it
    scores, sizes = [], []
    with zipfile.ZipFile(folder / "winogavil_images.zip") as zf, torch.no_grad():
        for cue, cands, assoc in games:
            batch = torch.stack([preprocess(Image.open(io.BytesIO(zf.read(f"winogavil_images/{c}.jpg"))))
                                 for c in cands])
            img = torch.nn.functional.normalize(model.encode_image(batch), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(tokenizer([cues[cue]])), dim=-1)
            logits = (txt @ img.T).squeeze(0).numpy()
            y_true = np.isin(cands, assoc)
            k = int(y_true.sum())
            order = np.sort(logits)
            assert order[-k] - order[-k - 1] > 1e-5  # no near-tie at the cut: batching cannot flip a pick
            y_pred = np.isin(np.arange(len(cands)), np.argsort(logits)[-k:])
            scores.append(jaccard_score(y_true, y_pred))
            sizes.append(len(cands))
    scores, sizes = np.array(scores), np.array(sizes)
    expected = {"avg_jaccard_score": scores.mean(), "jaccard_score_5": scores[sizes == 5].mean(),
                "jaccard_score_6": scores[sizes == 6].mean(), "jaccard_score_10": scores[sizes == 10].mean(),
                "jaccard_score_12": scores[sizes == 12].mean(), "jaccard_score_5-6": scores[sizes <= 6].mean(),
                "jaccard_score_10-12": scores[sizes >= 10].mean()}
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert 0.0 < scores.mean() < 1.0  # not a degenerate model: some games won, some lost


# --------------------------------------------------------------------------- bad input


def test_bad_sets_name_the_file_and_the_fix(known_set, tmp_path):
    bad = tmp_path / "nocol"
    bad.mkdir()
    (bad / winogavil.CSV_NAME).write_text("candidates,cue\n\"[\"\"a\"\"]\",x\n")
    with pytest.raises(ValueError, match=r"winogavil_dataset\.csv: column\(s\) associations missing.*evalsets download"):
        winogavil.read_games(bad)

    holes = write_winogavil_set(tmp_path / "holes", KNOWN_GAMES,
                                {n: colour_image(c) for n, c in POOL.items() if n != "fig2"})
    with pytest.raises(ValueError, match=r"winogavil_images\.zip: 1 candidate image\(s\) missing "
                                         r"\(winogavil_images/fig2\.jpg\).*download it again"):
        winogavil.check_set(holes)

    junk = tmp_path / "junkrow"
    junk.mkdir()
    (junk / winogavil.CSV_NAME).write_text("candidates,cue,associations\nnot json,x,[]\n")
    with pytest.raises(ValueError, match=r"winogavil_dataset\.csv, line 2: unreadable game"):
        winogavil.read_games(junk)

    half = tmp_path / "half"
    half.mkdir()
    (half / winogavil.CSV_NAME).write_bytes((known_set / winogavil.CSV_NAME).read_bytes())
    task = suites.datacomp_suite(tmp_path).task("misc/winogavil")
    assert "not found" in runner.task_problem(task)
    assert winogavil.problem(half) == f"incomplete eval set at {half}: winogavil_images.zip missing"

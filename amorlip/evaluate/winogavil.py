"""WinoGAViL (DataComp's ``misc/winogavil``): the association games, scored as DataComp scores them.

The data is the Hugging Face dataset repo ``nlphuji/winogavil``
(https://huggingface.co/datasets/nlphuji/winogavil), which DataComp reads with
``datasets.load_dataset("nlphuji/winogavil", split="test")``. That repo's loading script
(``winogavil.py``) only reads two plain files of the repo, so this project fetches those two with
``huggingface_hub.snapshot_download`` and reads them itself (no ``datasets``, whose 4.x releases no
longer run loading scripts):

- ``winogavil_dataset.csv``: one game per row; ``cue`` (text), ``candidates`` and ``associations``
  (JSON lists of image names), plus ``ID``, ``num_candidates``, ``num_associations`` and the game's
  human statistics;
- ``winogavil_images.zip``: the images, ``winogavil_images/<name>.jpg`` for each candidate name
  (the script's ``IMAGE_EXTENSION = "jpg"``). They are read from the zip; nothing is extracted.

The evaluation is DataComp's ``eval_utils/wino_eval.py``
(https://github.com/mlfoundations/datacomp/blob/main/eval_utils/wino_eval.py): per game, the cue
becomes the prompt ``"A <cue>"`` / ``"An <cue>"`` (lower-cased; ``An`` before a vowel), image and
text embeddings are L2-normalised, the ``k`` candidates with the highest cosine similarity are
picked, ``k`` being the number of candidates that are true associations
(``np.isin(candidates, associations).sum()``), and the game scores the Jaccard index of picked and
true sets (scikit-learn's binary ``jaccard_score``). DataComp reports the mean over all games and per
number of candidates: ``jaccard_score_5``, ``_6``, ``_10``, ``_12``, ``_5-6`` (<= 6 candidates) and
``_10-12`` (>= 10 candidates, its main metric, tasklist.yml). A group without games is left out
(DataComp would report NaN).

Differences that do not change the definition: each distinct image and cue is embedded once, in
batches (DataComp embeds every game's candidates again, one game per batch; the same name is the
same image file), and in fp32 like the project's other tasks (DataComp's loop runs under CUDA
autocast). Near-ties may therefore fall either way within float rounding.

Chance: ``chance_<metric>`` is the exact expected Jaccard index of a uniformly random choice of
``k`` of the ``n`` candidates (hypergeometric overlap), averaged over the same games.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

SOURCE = "nlphuji/winogavil"
CSV_NAME = "winogavil_dataset.csv"
ZIP_NAME = "winogavil_images.zip"
IMAGE_DIR = "winogavil_images"
IMAGE_EXTENSION = "jpg"
FILES = (CSV_NAME, ZIP_NAME)
REQUIRED_COLUMNS = ("cue", "candidates", "associations")
MAIN_METRIC = "jaccard_score_10-12"
_FIX = "download it again: `amorlip evalsets download datacomp --root <datacomp_root> --tasks misc/winogavil`"


@dataclass(frozen=True)
class Game:
    """One WinoGAViL game: the cue, the candidate image names and the true associations."""

    id: str
    cue: str
    candidates: tuple[str, ...]
    associations: tuple[str, ...]

    @property
    def truth(self) -> np.ndarray:
        """Which candidates are associations (DataComp's ``np.isin(candidates, associations)``)."""
        return np.isin(np.array(self.candidates), np.array(self.associations))


def clip_prompt(cue: str) -> str:
    """DataComp's ``get_clip_prompt``: ``"An <cue>"`` before a vowel, else ``"A <cue>"``, lower-cased."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in ("a", "e", "i", "o", "u") else f"A {cue}"


# --------------------------------------------------------------------------- pure scoring


def pick_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """DataComp's choice: ``np.isin(arange(n), argsort(scores)[-k:])`` (k = 0 picks every candidate,
    as ``[-0:]`` does there)."""
    scores = np.asarray(scores)
    return np.isin(np.arange(len(scores)), np.argsort(scores)[-k:])


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """|true & picked| / |true | picked| of two boolean masks (0 when both are empty, as scikit-learn)."""
    union = int(np.logical_or(y_true, y_pred).sum())
    return int(np.logical_and(y_true, y_pred).sum()) / union if union else 0.0


def random_jaccard(n: int, k: int) -> float:
    """Expected Jaccard index of ``k`` of ``n`` candidates picked uniformly at random against ``k`` true
    ones: sum over the overlap j (hypergeometric) of P(j) * j / (2k - j)."""
    if k <= 0:
        return 0.0
    total = math.comb(n, k)
    return sum(math.comb(k, j) * math.comb(n - k, k - j) / total * j / (2 * k - j) for j in range(1, k + 1))


# DataComp's groups by number of candidates: metric -> which game sizes it averages
GROUPS: dict[str, Callable[[int], bool]] = {
    "avg_jaccard_score": lambda n: True,
    "jaccard_score_5": lambda n: n == 5,
    "jaccard_score_6": lambda n: n == 6,
    "jaccard_score_10": lambda n: n == 10,
    "jaccard_score_12": lambda n: n == 12,
    "jaccard_score_5-6": lambda n: n <= 6,
    "jaccard_score_10-12": lambda n: n >= 10,
}


def aggregate(scores: Sequence[float], sizes: Sequence[int], chances: Sequence[float] | None = None) -> dict[str, float]:
    """Mean Jaccard per DataComp group (empty groups left out), ``chance_<group>`` when ``chances``
    is given, ``num_games_<group>`` and ``num_samples`` (all games)."""
    scores, sizes = np.asarray(scores, dtype=np.float64), np.asarray(sizes)
    out: dict[str, float] = {}
    for name, member in GROUPS.items():
        mask = np.array([member(int(n)) for n in sizes], dtype=bool)
        if not mask.any():
            continue
        out[name] = float(scores[mask].mean())
        if chances is not None:
            out[f"chance_{name}"] = float(np.asarray(chances, dtype=np.float64)[mask].mean())
        out[f"num_games_{name}"] = int(mask.sum())
    out["num_samples"] = len(scores)
    return out


# --------------------------------------------------------------------------- reading the set


def problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a WinoGAViL set (None when both files are there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"eval set not found at {folder}"
    absent = [name for name in FILES if not (folder / name).is_file()]
    if absent:
        return f"incomplete eval set at {folder}: {', '.join(absent)} missing"
    return None


def read_games(folder: str | Path) -> list[Game]:
    """The games of ``<folder>/winogavil_dataset.csv``, in file order."""
    path = Path(folder) / CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {_FIX}")
    games = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        absent = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path}: column(s) {', '.join(absent)} missing (header: {reader.fieldnames}); "
                             f"not the nlphuji/winogavil CSV: {_FIX}")
        for line, row in enumerate(reader, start=2):
            try:
                candidates, associations = json.loads(row["candidates"]), json.loads(row["associations"])
                if not (isinstance(candidates, list) and isinstance(associations, list) and candidates):
                    raise ValueError("candidates/associations must be JSON lists, candidates non-empty")
                cue = row["cue"]
                if not cue:
                    raise ValueError("empty cue")
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}, line {line}: unreadable game ({exc}); {_FIX}") from exc
            games.append(Game(id=str(row.get("ID") or line - 2), cue=cue,
                              candidates=tuple(map(str, candidates)), associations=tuple(map(str, associations))))
    if not games:
        raise ValueError(f"{path}: no games; {_FIX}")
    return games


def image_members(zip_path: str | Path, names: Sequence[str]) -> dict[str, str]:
    """Candidate name -> its member ``winogavil_images/<name>.jpg`` in the zip (an error lists the absent ones)."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise FileNotFoundError(f"{zip_path} not found: {_FIX}")
    if not zipfile.is_zipfile(zip_path):
        raise ValueError(f"{zip_path} is not a zip archive (truncated download?); {_FIX}")
    with zipfile.ZipFile(zip_path) as zf:
        present = set(zf.namelist())
    members = {name: f"{IMAGE_DIR}/{name}.{IMAGE_EXTENSION}" for name in names}
    absent = sorted(m for m in members.values() if m not in present)
    if absent:
        raise ValueError(f"{zip_path}: {len(absent)} candidate image(s) missing ({', '.join(absent[:5])}); {_FIX}")
    return members


def check_set(folder: str | Path) -> int:
    """Check a downloaded set (the CSV parses, every candidate's image is in the zip); return the game count."""
    games = read_games(folder)
    image_members(Path(folder) / ZIP_NAME, sorted({c for g in games for c in g.candidates}))
    return len(games)


class _ZipImages(torch.utils.data.Dataset):
    """The candidate images of the zip, decoded with PIL as ``datasets.Image`` decodes them (no mode
    conversion: the model's transform does what DataComp's does with them)."""

    def __init__(self, zip_path: Path, members: Sequence[str], transform: Callable):
        self.zip_path, self.members, self.transform = zip_path, list(members), transform
        self._zip = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int):
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.zip_path)
        data = self._zip.read(self.members[i])
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:  # noqa: BLE001 -- name the bad member whatever PIL raised
            raise ValueError(f"{self.zip_path}: {self.members[i]} is not a readable image ({exc}); {_FIX}") from exc
        return self.transform(image)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# --------------------------------------------------------------------------- evaluation


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def embed(model, tokenizer, folder: str | Path, transform: Callable, games: Sequence[Game], device: str = "cpu",
          batch_size: int = 64, workers: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Normalised embeddings of every distinct candidate image and cue prompt of ``games`` (on the CPU)."""
    names = sorted({c for g in games for c in g.candidates})
    members = image_members(Path(folder) / ZIP_NAME, names)
    loader = torch.utils.data.DataLoader(_ZipImages(Path(folder) / ZIP_NAME, [members[n] for n in names], transform),
                                         batch_size=batch_size, num_workers=workers)
    prompts = sorted({clip_prompt(g.cue) for g in games})
    image_feats, text_feats = [], []
    with torch.no_grad():
        try:
            for images in loader:
                image_feats.append(_normalize(model.encode_image(images.to(device))).cpu())
        finally:
            loader.dataset.close()
        for i in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[i:i + batch_size])
            text_feats.append(_normalize(model.encode_text(tokens.to(device))).cpu())
    images_by_name = dict(zip(names, torch.cat(image_feats)))
    texts_by_prompt = dict(zip(prompts, torch.cat(text_feats)))
    return images_by_name, texts_by_prompt


def score_games(games: Sequence[Game], images: dict[str, torch.Tensor],
                texts: dict[str, torch.Tensor]) -> tuple[list[float], list[int], list[float]]:
    """Per game: the Jaccard index of the model's top-k pick, the number of candidates, the chance level."""
    scores, sizes, chances = [], [], []
    for game in games:
        sims = (torch.stack([images[c] for c in game.candidates]) @ texts[clip_prompt(game.cue)]).numpy()
        truth = game.truth
        k = int(truth.sum())
        scores.append(jaccard(truth, pick_top_k(sims, k)))
        sizes.append(len(game.candidates))
        chances.append(random_jaccard(len(game.candidates), k))
    return scores, sizes, chances


def evaluate_winogavil(model, tokenizer, folder: str | Path, transform: Callable, device: str = "cpu",
                       batch_size: int = 64, workers: int = 0) -> dict[str, float]:
    """DataComp's WinoGAViL metrics (fractions), their chance levels and the game counts."""
    games = read_games(folder)
    images, texts = embed(model, tokenizer, folder, transform, games, device, batch_size, workers)
    scores, sizes, chances = score_games(games, images, texts)
    return aggregate(scores, sizes, chances)

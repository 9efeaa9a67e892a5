"""One validation metric for every method: the symmetric InfoNCE of a fixed batch at a fixed temperature.

Each method logs its own objective under ``loss`` (CLIP's InfoNCE, SigLIP's sigmoid loss, AmorLIP's
amortized loss, FastCLIP's moving-estimate loss), so their training curves are not comparable. This
module scores every run the same way, on the same samples:

    val_infonce = 1/2 [ -1/B sum_i log softmax_j(s x_i.y_j)_i  -  1/B sum_i log softmax_j(s y_i.x_j)_i ]

with L2-normalised image features x and text features y of a fixed set of B samples, and a
**fixed** scale s = 1 / ``validation.temperature`` (0.07 by default, CLIP's initial temperature,
Radford et al. 2021, https://arxiv.org/abs/2103.00020), not the model's learnable one: with the
model's own s the metric would also move with the temperature, which each method drives
differently (SigLIP's scale means something else altogether). It is computed in float64 with
logsumexp. Lower is better; a model that ignores its input scores log B.

**The samples** (``validation_samples``): from the run's training shards, read in sorted shard
order until a pool of ``4 x batch_size`` samples (or the whole data set) is in memory, then the B
samples of smallest ``sha256(seed, key)`` (:func:`amorlip.diagnostics.probe_priority`). This works
on every data set (none needs a held-out split), reads a few shards at most, and depends only on the
shards' contents and ``validation.seed`` (not the run's seed), so every run on one data set is scored
on the same batch. These samples are *not* held out from training: the metric compares how the
methods align one fixed batch, under one objective; the zero-shot evaluation is the held-out measure.
When the data set holds fewer than ``batch_size`` decodable samples, all of them are used and the
batch actually scored is logged as ``val_batch`` (the metric grows with log B, so compare runs at
the same ``val_batch``).

**On W ranks** every rank embeds its own slice of the batch (``ceil(B / W)`` rows, the last slice
padded by repeating its last row), the slices are all-gathered over the training group and every
rank computes the same loss from the full feature matrices; rank 0 logs it. Every rank runs the same
number of forward calls, so this is also correct under ZeRO-3, whose forward gathers partitioned
weights collectively.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

POOL_FACTOR = 4  # the pool the batch is drawn from: this many batches' worth of the first shards


class ValidationError(ValueError):
    """The validation batch cannot be built (no decodable sample)."""


def symmetric_infonce(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """Mean of the image->text and text->image cross-entropies of ``scale * img @ txt.T`` (float64).

    ``img`` and ``txt`` are ``[B, d]`` L2-normalised features, row i of each a matching pair.
    """
    img, txt = img.double(), txt.double()
    logits = scale * img @ txt.T
    diag = logits.diagonal()
    i2t = (torch.logsumexp(logits, dim=1) - diag).mean()
    t2i = (torch.logsumexp(logits, dim=0) - diag).mean()
    return float(0.5 * (i2t + t2i))


def validation_samples(shard_dir: str | os.PathLike, batch_size: int, seed: int
                       ) -> list[tuple[str, bytes, str]]:
    """``[(key, image bytes, caption)]``, sorted by key: the fixed validation samples (module docstring)."""
    from amorlip.data.loader import _DropCounter, iter_shard, read_sizes
    from amorlip.diagnostics import probe_priority

    shard_dir = Path(shard_dir)
    pool: list[tuple[int, str, bytes, str]] = []
    drops = _DropCounter()
    for name in sorted(read_sizes(shard_dir)):
        for key, image, caption, *_ in iter_shard(shard_dir / Path(name).name, drops):
            pool.append((probe_priority(seed, key), key, image, caption))
        if len(pool) >= POOL_FACTOR * batch_size:
            break
    chosen = sorted(pool)[:batch_size]
    return sorted(((k, im, cap) for _, k, im, cap in chosen), key=lambda s: s[0])


def _decode(samples: list[tuple[str, bytes, str]], preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [N, 3, H, W], tokens [N, L])``; an image that does not decode is left out with its caption."""
    from amorlip.data.pixels import decode_pairs

    decoded = decode_pairs(samples, preprocess, tokenizer)
    if decoded is None:
        raise ValidationError("no validation image decodes")
    return decoded


class FixedBatchValidation:
    """The trainer's validation: built once per run, called with the current model on every rank.

    ``validation`` is the run's ``validation`` block (``batch_size``, ``temperature``, ``seed``);
    ``rank``, ``world_size`` and ``group`` come from the job's :class:`amorlip.distributed.WorldInfo`.
    The samples are read and preprocessed (eval transform) on the first call.
    """

    def __init__(self, shard_dir: str | os.PathLike, model_name: str, validation, device, *,
                 rank: int = 0, world_size: int = 1, group=None, chunk: int = 128):
        self.shard_dir, self.model_name, self.validation = Path(shard_dir), model_name, validation
        self.device, self.rank, self.world_size, self.group, self.chunk = device, rank, world_size, group, chunk
        self._slice: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batch = 0  # the batch actually scored (fewer than batch_size when the data holds fewer)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from amorlip.models import get_tokenizer, image_transform

        samples = validation_samples(self.shard_dir, int(self.validation.batch_size), int(self.validation.seed))
        try:
            pixels, tokens = _decode(samples, image_transform(self.model_name, train=False),
                                     get_tokenizer(self.model_name))
        except ValidationError as exc:
            raise ValidationError(f"{exc} among the {len(samples)} validation samples of {self.shard_dir}: check the "
                                  "shards (amorlip index), or turn the metric off with validation: {every_epochs: 0, "
                                  "every_steps: 0}") from None
        self.batch = n = pixels.shape[0]
        if n < self.validation.batch_size and self.rank == 0:
            log.warning("validation: %d decodable samples in %s, fewer than validation.batch_size %d: scoring "
                        "all %d (logged as val_batch)", n, self.shard_dir, self.validation.batch_size, n)
        per_rank = math.ceil(n / self.world_size)
        rows = torch.arange(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = rows.clamp(max=n - 1)  # the last slice padded with a repeated row, dropped after the gather
        return pixels[rows], tokens[rows]

    def prepare(self) -> FixedBatchValidation:
        """Read and preprocess this rank's slice now, so a data problem stops the job before training."""
        if self._slice is None:
            self._slice = self._load()
        return self

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """``{"val_infonce": float, "val_batch": int}`` for the model now (collective on W ranks)."""
        pixels, tokens = self.prepare()._slice
        dtype = next(model.parameters()).dtype
        was_training = model.training
        model.eval()
        try:
            img, txt = [], []
            for k in range(0, pixels.shape[0], self.chunk):
                img.append(model.encode_image(pixels[k:k + self.chunk].to(self.device, dtype), normalize=True).float())
                txt.append(model.encode_text(tokens[k:k + self.chunk].to(self.device), normalize=True).float())
        finally:
            model.train(was_training)
        img, txt = torch.cat(img), torch.cat(txt)
        if self.world_size > 1:
            img, txt = _gather_rows(img, self.world_size, self.group), _gather_rows(txt, self.world_size, self.group)
        img, txt = img[:self.batch], txt[:self.batch]  # the padding rows of the last slice out
        loss = symmetric_infonce(img.cpu(), txt.cpu(), 1.0 / float(self.validation.temperature))
        return {"val_infonce": loss, "val_batch": self.batch}


def _gather_rows(local: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """The ranks' equal-sized row blocks, concatenated in rank order."""
    parts = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)

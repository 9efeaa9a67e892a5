"""The training data pipeline: img2dataset webdataset shards -> deterministic, resumable batches.

Public API::

    loader = TrainLoader(shard_dir, sizes=None,            # None: sizes.json in shard_dir or its parent
                         local_batch_size=B, rank=r, world_size=n, workers=w, seed=s,
                         preprocess=preprocess_train,      # PIL.Image -> FloatTensor[3, H, W]
                         tokenizer=tokenizer,              # list[str] -> LongTensor[B, ctx]
                         samples_per_epoch=None,           # None: sum(sizes)
                         device_transform=None)            # applied by the trainer on the device
    loader.steps_per_epoch == len(loader)  # samples_per_epoch // (B * n), at least 1; equal on all ranks
    for batch in loader.epoch(e, start_step=k):            # exactly steps_per_epoch - k batches
        batch["images"]   # Tensor[B, 3, H, W]: what preprocess gives (uint8 in training, see data/pixels.py)
        batch["texts"]    # LongTensor[B, ctx]
        batch["keys"]     # list[str]: the img2dataset keys of the B samples
        batch["indices"]  # LongTensor[B]: each sample's dense data-set index (see ``dataset_offsets``)
        batch["skipped"]  # int: corrupt samples dropped while this batch was assembled
        batch["step"]     # int: step within the epoch (k, k+1, ...)

Why it is built this way:

- **Fixed-length epochs.** Every rank yields exactly ``steps_per_epoch`` batches, so DeepSpeed's
  collectives never wait on a rank that ran out of data. Data is *resampled*: each epoch draws passes
  over the shards, pass ``p`` being a permutation seeded by ``(seed, epoch, p)`` and split over the
  ``world_size x max(workers, 1)`` slots (by node, then by worker; no sample in two slots within a
  pass). A slot that exhausts its share starts its next pass; with fewer shards than slots, slots
  split each shard's samples among themselves (a warning says so). Within a pass a seeded buffer of
  ``shuffle_buffer`` samples shuffles the order; it drains at the end of the pass, so a pass never
  mixes with the next one.
- **Deterministic and resumable.** Step ``t`` is assembled by slot ``t % V`` (V = max(workers, 1))
  from its own seeded stream, whichever process computes it. ``epoch(e, start_step=k)`` replays the
  streams up to step ``k`` on raw tar bytes only (no image decoding, no transform) and then yields
  the same batches, keys and order as an uninterrupted ``epoch(e)`` from step ``k``. Augmentations
  are seeded per ``(seed, epoch, rank, step)``, so resumed images match too. The keys depend on the
  ``workers`` count: resume with the same count.
- **Corrupt data is counted, never silent.** Samples without an image, without ``.txt`` or with an
  empty caption are dropped from the stream; a truncated tar yields the samples before the damage.
  These never shift the batches between a resumed and an uninterrupted run. An image that fails to
  decode is only found after the skip point, so its place in the batch is filled with another sample
  of the same batch (the batch size stays B on every rank, as the all-gather needs). Each is counted
  in ``skipped``; each kind of damage is logged once per shard and process (with workers: once per
  worker).
- **Workers.** With ``workers > 0`` a torch ``DataLoader`` runs one slot per worker, each producing
  whole batches (decode, transform, tokenize in the worker); the main process puts them back in step
  order. The workers persist across epochs (each epoch's position reaches them through shared
  memory), and in training they ship uint8 pixels that the trainer normalises on the device
  (``device_transform``). ``workers == 0`` runs in-process.
- **Plain tarfile, not webdataset's pipeline stages.** Replaying a resumed epoch without decoding
  and draining the shuffle buffer at each pass boundary need control over where decoding happens;
  the members are grouped by key exactly as webdataset's ``tarfile_to_samples`` groups them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import signal
import tarfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from PIL import Image

from amorlip.data import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

_WANTED = frozenset((*IMAGE_EXTENSIONS, "txt"))
SHUFFLE_BUFFER = 1000
# img2dataset already resized every image; anything far larger is hostile, not data
MAX_IMAGE_PIXELS = 64_000_000
_MAX_EMPTY_PASSES = 100
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_warned: set[tuple[str, str]] = set()

# a raw sample: (key, image bytes, caption, shard name, position of its key group in the shard)
RawSample = tuple[str, bytes, str, str, int]


def _warn_once(shard: str, kind: str, detail: str = "") -> None:
    """One warning line per (shard, kind of damage) per process."""
    if (shard, kind) not in _warned:
        _warned.add((shard, kind))
        log.warning("loader: shard %s: %s%s (counted in 'skipped'; further ones in this shard not logged)",
                    shard, kind, f" ({detail})" if detail else "")


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dataset_offsets(sizes: Mapping[str, int]) -> dict[str, int]:
    """Each shard's first dense data-set index: cumulative sizes over the shards sorted by name.

    A sample's dense index is its shard's offset plus its position among the shard's key groups (the
    shards are in key order, see ``amorlip.data.reshard``), so it names the same sample whatever the
    shard order of a pass, the worker or rank that reads it, and across resumes: per-sample state
    (FastCLIP's u) is indexed by it. Shards of size 0 take no index.
    """
    offsets, total = {}, 0
    for name, n in sorted(sizes.items()):
        if int(n) > 0:
            offsets[Path(name).name] = total
            total += int(n)
    return offsets


def read_sizes(shard_dir: str | Path) -> dict[str, int]:
    """sizes.json beside the shards (tests) or in their parent (``data/{dataset}/sizes.json``)."""
    shard_dir = Path(shard_dir)
    for candidate in (shard_dir / "sizes.json", shard_dir.parent / "sizes.json"):
        if candidate.exists():
            with open(candidate) as fh:
                return {str(k): int(v) for k, v in json.load(fh).items()}
    raise FileNotFoundError(f"no sizes.json in {shard_dir} or {shard_dir.parent}; run `amorlip index` first")


class _DropCounter:
    """Samples dropped from the raw stream since the last batch was cut."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def iter_shard(path: Path, drops: _DropCounter, part: int = 0, nparts: int = 1) -> Iterator[RawSample]:
    """Raw samples of one tar (members grouped by key, as webdataset does), keeping every
    ``nparts``-th group starting at ``part``. Only image and caption bytes are read. The last field
    is the sample's position among the shard's groups that hold an image member (what sizes.json
    counts: img2dataset's successes), whatever part reads it and before any sample is dropped."""
    shard = path.name
    key: str | None = None
    group: dict[str, bytes] = {}
    index = -1
    position = -1  # image-bearing groups up to and including the current one, minus one
    has_image = False

    def finish() -> Iterator[RawSample]:
        if key is None or index % nparts != part:
            return
        image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        caption = group.get("txt", b"").decode("utf-8", errors="replace").strip()
        if image is None:
            drops.n += 1
            _warn_once(shard, "sample without an image")
        elif "txt" not in group:
            drops.n += 1
            _warn_once(shard, "sample without a .txt caption")
        elif not caption:
            drops.n += 1
            _warn_once(shard, "sample with an empty caption")
        else:
            yield key, image, caption, shard, position

    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name = member.name
                dot = name.find(".", name.rfind("/") + 1)
                if dot < 0:
                    continue
                member_key, ext = name[:dot], name[dot + 1 :].lower()
                if member_key != key:
                    yield from finish()
                    key, group, index, has_image = member_key, {}, index + 1, False
                if ext in IMAGE_EXTENSIONS and not has_image:
                    has_image, position = True, position + 1
                if ext in _WANTED and index % nparts == part:
                    group[ext] = tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        _warn_once(shard, "unreadable tar, samples before the damage are used",
                   f"{type(exc).__name__}: {exc}")
        complete = "txt" in group and any(e in group for e in IMAGE_EXTENSIONS)
        if key is not None and index % nparts == part and complete:
            yield from finish()  # the damage came after a complete sample
        else:
            drops.n += 1  # the sample the damage cut
        return
    yield from finish()


def _shuffled(samples: Iterator[RawSample], buffer_size: int, rng: random.Random) -> Iterator[RawSample]:
    """Seeded buffered shuffle that drains when ``samples`` ends (one pass never leaks into the next)."""
    buf: list[RawSample] = []
    for sample in samples:
        if len(buf) < buffer_size:
            buf.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


class TrainLoader:
    """Deterministic, resumable, fixed-length batches for one rank (see the module docstring)."""

    def __init__(
        self,
        shard_dir: str | Path,
        sizes: Mapping[str, int] | None = None,
        *,
        local_batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        pin_memory: bool = False,
        device_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if local_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0:
            raise ValueError(f"bad loader geometry: local_batch_size={local_batch_size}, rank={rank}, "
                             f"world_size={world_size}, workers={workers}")
        self.shard_dir = Path(shard_dir)
        sizes = dict(sizes) if sizes is not None else read_sizes(self.shard_dir)
        self.sizes = {name: int(n) for name, n in sorted(sizes.items()) if int(n) > 0}
        if not self.sizes:
            raise ValueError(f"no samples: sizes for {self.shard_dir} are empty or all zero")
        self.shards = [self.shard_dir / Path(name).name for name in self.sizes]
        absent = [str(p) for p in self.shards if not p.exists()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} shard(s) listed in sizes.json are missing, "
                                    f"e.g. {absent[0]}")
        self.total_samples = sum(self.sizes.values())
        self.offsets = dataset_offsets(self.sizes)
        self._shard_sizes = {Path(name).name: n for name, n in self.sizes.items()}
        if self.total_samples < local_batch_size * world_size:
            # the streams run pass after pass, so such a batch would hold the same pair more than once
            # (a contrastive loss then treats an image's own copy as a negative): refuse it
            raise ValueError(
                f"{self.shard_dir} holds {self.total_samples} samples, fewer than one global batch of "
                f"{local_batch_size * world_size}: every batch would repeat samples. Lower batch_size to at "
                f"most {self.total_samples}, or add data")
        self.local_batch_size = local_batch_size
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.seed = seed
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.pin_memory = pin_memory
        # applied by the trainer to each batch once it is on the device (uint8 -> normalised fp32)
        self.device_transform = device_transform
        self._data_loader = None
        self._dataset: _EpochDataset | None = None
        self.samples_per_epoch = samples_per_epoch or self.total_samples
        self.steps_per_epoch = max(1, self.samples_per_epoch // (local_batch_size * world_size))
        self.slots_per_rank = max(1, workers)
        self.num_slots = world_size * self.slots_per_rank
        if len(self.shards) < self.num_slots:
            log.warning("loader: %d shard(s) for %d slots (%d ranks x %d workers): slots split each shard's "
                        "samples; more shards read faster", len(self.shards), self.num_slots, world_size,
                        self.slots_per_rank)
        log.info("loader rank %d/%d: %d samples in %d shards, %d steps/epoch of %d, %d worker(s)",
                 rank, world_size, self.total_samples, len(self.shards), self.steps_per_epoch,
                 local_batch_size, workers)

    def __len__(self) -> int:
        return self.steps_per_epoch

    # ------------------------------------------------------------------ the per-slot streams

    def _pass_shards(self, epoch: int, pass_index: int, slot: int) -> list[tuple[Path, int, int]]:
        """(shard, part, nparts) read by ``slot`` in one pass; all slots together read each sample once."""
        order = list(range(len(self.shards)))
        random.Random(derive_seed(self.seed, epoch, pass_index, "shards")).shuffle(order)
        n = len(order)
        if n >= self.num_slots:
            return [(self.shards[order[i]], 0, 1) for i in range(slot, n, self.num_slots)]
        j = slot % n
        return [(self.shards[order[j]], slot // n, len(range(j, self.num_slots, n)))]

    def _raw_stream(self, epoch: int, slot: int, drops: _DropCounter) -> Iterator[RawSample]:
        """Endless raw samples of one slot: pass after pass, each shuffled within itself."""
        rng = random.Random(derive_seed(self.seed, epoch, slot, "samples"))
        empty_passes = 0
        for pass_index in itertools.count():
            produced = 0
            samples = itertools.chain.from_iterable(
                iter_shard(path, drops, part, nparts)
                for path, part, nparts in self._pass_shards(epoch, pass_index, slot)
            )
            for sample in _shuffled(samples, self.shuffle_buffer, rng):
                produced += 1
                yield sample
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes >= _MAX_EMPTY_PASSES:
                raise RuntimeError(f"loader: slot {slot} found no loadable sample in {_MAX_EMPTY_PASSES} "
                                   f"passes over {self.shard_dir}; the shards are empty or corrupt")

    def _slot_batches(self, epoch: int, virtual_slot: int, start_step: int,
                      in_process: bool) -> Iterator[dict]:
        """Batches for steps ``virtual_slot, virtual_slot + V, ...`` from ``start_step`` on."""
        drops = _DropCounter()
        raw = self._raw_stream(epoch, self.rank * self.slots_per_rank + virtual_slot, drops)
        for step in range(virtual_slot, self.steps_per_epoch, self.slots_per_rank):
            samples = list(itertools.islice(raw, self.local_batch_size))
            skipped = drops.take()
            if step < start_step:
                continue  # replay without decoding: resume costs tar reading only
            yield self._decode_batch(samples, skipped, epoch, step, in_process)

    # ------------------------------------------------------------------ decoding

    def _decode_batch(self, samples: list[RawSample], skipped: int, epoch: int, step: int,
                      in_process: bool) -> dict:
        images: list[Image.Image | None] = []
        for key, data, _, shard, _ in samples:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise ValueError(f"{im.width}x{im.height} image exceeds {MAX_IMAGE_PIXELS} pixels")
                    images.append(im.convert("RGB"))
            except _DECODE_ERRORS as exc:
                images.append(None)
                _warn_once(shard, "undecodable image", f"{key}: {type(exc).__name__}: {exc}")
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            raise RuntimeError(f"loader: none of the {len(samples)} images of step {step} (epoch {epoch}, "
                               f"rank {self.rank}) decodes; shards {sorted({s[3] for s in samples})} "
                               "are corrupt")
        bad = [i for i, im in enumerate(images) if im is None]
        # keep B fixed on every rank: a corrupt image's place goes to another sample of this batch
        for n, i in enumerate(bad):
            images[i] = images[good[n % len(good)]]
            samples[i] = samples[good[n % len(good)]]
        augment_seed = derive_seed(self.seed, epoch, self.rank, step, "augment")
        if in_process:
            with torch.random.fork_rng(devices=[]):  # leave the trainer's RNG untouched
                torch.manual_seed(augment_seed)
                pixels = torch.stack([self.preprocess(im) for im in images])
        else:
            torch.manual_seed(augment_seed)
            pixels = torch.stack([self.preprocess(im) for im in images])
        return {
            "images": pixels,
            "texts": self.tokenizer([s[2] for s in samples]),
            "keys": [s[0] for s in samples],
            "indices": torch.tensor([self._dense_index(s[3], s[4]) for s in samples], dtype=torch.long),
            "skipped": skipped + len(bad),
            "step": step,
        }

    def _dense_index(self, shard: str, position: int) -> int:
        """``offsets[shard] + position``; a position past the shard's size means sizes.json is stale."""
        size = self._shard_sizes[shard]
        if position >= size:
            raise RuntimeError(f"loader: shard {shard} holds more than the {size} samples sizes.json lists; "
                               "re-run `amorlip index` (dense sample indices would collide)")
        return self.offsets[shard] + position

    # ------------------------------------------------------------------ epochs

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Batches ``start_step .. steps_per_epoch - 1`` of ``epoch`` for this rank, in step order."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        if self.workers == 0:
            yield from self._slot_batches(epoch, 0, start_step, in_process=True)
            return
        if self._data_loader is None:
            # built once: the workers persist across epochs (no fork of the whole process, and no
            # re-import in every worker, at each epoch start); each epoch tells them where to start
            # through shared memory before the DataLoader's next iteration starts them again
            self._dataset = _EpochDataset(self)
            self._data_loader = torch.utils.data.DataLoader(
                self._dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                worker_init_fn=_ignore_stop_signals, persistent_workers=True)
            # persistent workers outlive an epoch left early (a run that stops mid-epoch): shut them
            # down explicitly when the loader goes away or the interpreter exits, or exit would hang
            self._closer = weakref.finalize(self, _shutdown_workers, self._data_loader)
        self._dataset.set_position(epoch, start_step)
        expected, pending = start_step, {}
        for batch in self._data_loader:
            pending[batch["step"]] = batch
            while expected in pending:
                yield pending.pop(expected)
                expected += 1
        if expected != self.steps_per_epoch or pending:
            raise RuntimeError(f"loader: epoch {epoch} rank {self.rank} ended at step {expected} of "
                               f"{self.steps_per_epoch} (pending {sorted(pending)})")


def _shutdown_workers(data_loader) -> None:
    iterator = getattr(data_loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1: SLURM preemption signals the whole process group, and a
    worker dying on it would kill the main process before it can write its checkpoint. The main
    process shuts the workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch at a time for persistent DataLoader workers: worker ``w`` computes the steps of slot
    ``(start_step + w) % V``, so the DataLoader's round-robin over workers delivers steps in order.

    The position (epoch, start step) lives in shared memory: persistent workers keep the copy of this
    object they started with, and read the position each time an iteration (an epoch) starts them.
    """

    def __init__(self, loader: TrainLoader) -> None:
        super().__init__()
        import multiprocessing

        self.loader = loader
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._start_step = multiprocessing.Value("q", 0, lock=False)

    def set_position(self, epoch: int, start_step: int) -> None:
        self._epoch.value, self._start_step.value = epoch, start_step

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start_step = int(self._epoch.value), int(self._start_step.value)
        virtual_slot = (start_step + worker) % self.loader.slots_per_rank
        return self.loader._slot_batches(epoch, virtual_slot, start_step, in_process=info is None)

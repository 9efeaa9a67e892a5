"""How much a training step communicates: collectives counted by kind, with the bytes they move.

Two sources, kept apart because one is measured and the other is not:

- **counted**: every collective the project itself issues goes through a helper that calls
  :func:`record` (``amorlip.objectives.distributed``: the feature all-gathers with and without grad,
  the reduce-scatter of the autograd all-gather's backward, the lambda nets' gradient all-reduce;
  ``amorlip.distributed.all_reduce_``: the trainer's step flags and metric means). Recording reads
  only shapes and dtypes, never values, so it adds no host-device synchronisation.
- **computed**: DeepSpeed's own traffic (the encoders' gradient reduction and, under ZeRO 1/2, the
  all-gather of the updated parameter partitions) from the parameter count and the ZeRO stage
  (:func:`deepspeed_step_traffic`). ``tests/test_collectives.py`` checks it against the calls
  DeepSpeed really makes on 2 gloo ranks.

Bytes are *payload* bytes per rank: all-gather, the gathered output (W x the local input);
all-reduce, the buffer; reduce-scatter, its input (W x the local output). A ring algorithm sends
(W-1)/W of the payload per rank for all-gather and reduce-scatter and 2(W-1)/W for all-reduce
(:func:`ring_wire_bytes`); ``benchmarks/collectives.py`` uses that for its projections.

One process is one rank, so the counter is a module-level table. The trainer takes it at step
boundaries (:func:`take`) and averages per step in a :class:`StepAccounting`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# the DeepSpeed kinds (computed, not counted)
DS_GRAD_ALL_REDUCE = "deepspeed_grad_all_reduce"
DS_GRAD_REDUCE_SCATTER = "deepspeed_grad_reduce_scatter"
DS_PARAM_ALL_GATHER = "deepspeed_param_all_gather"
# DeepSpeed ZeRO 1/2 pads each flat parameter group to a multiple of this times the world size
# (deepspeed/runtime/zero/stage_1_and_2.py: nccl_start_alignment_factor = 2)
_ZERO_ALIGNMENT = 2

_counts: dict[str, list[int]] = {}


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s elements (shape and dtype only: no read of the device)."""
    return tensor.numel() * tensor.element_size()


def record(kind: str, nbytes: int, calls: int = 1) -> None:
    """Count ``calls`` collective(s) of ``kind`` moving ``nbytes`` payload bytes on this rank."""
    entry = _counts.setdefault(kind, [0, 0])
    entry[0] += calls
    entry[1] += int(nbytes)


def take() -> dict[str, tuple[int, int]]:
    """``{kind: (calls, bytes)}`` recorded since the last take; the table starts again empty."""
    out = {k: (v[0], v[1]) for k, v in _counts.items()}
    _counts.clear()
    return out


def ring_wire_bytes(kind: str, payload: float, world_size: int) -> float:
    """Bytes one rank sends for ``payload`` bytes of ``kind`` with a ring algorithm (what NCCL uses
    within a node): all-reduce 2(W-1)/W, every other kind (W-1)/W of the payload."""
    if world_size <= 1:
        return 0.0
    share = (world_size - 1) / world_size
    return payload * share * (2.0 if kind.endswith("all_reduce") else 1.0)


def deepspeed_step_traffic(group_sizes: Iterable[int], zero_stage: int, world_size: int,
                           bucket_elements: int, elem_bytes: int = 4) -> dict[str, tuple[int, int]]:
    """DeepSpeed's per-step collectives for trainable parameter groups of ``group_sizes`` elements.

    ZeRO 0: the gradients all-reduced. ZeRO 1/2 (DeepSpeed 0.19.8): the gradients all-reduced too
    (``use_multi_rank_bucket_allreduce``, on by default: each bucket is all-reduced and every rank
    keeps its partition), then the updated fp32 partitions all-gathered, each flat group padded to
    a multiple of 2 x W; so ZeRO 1/2 send 3(W-1)/W of the model per rank and step where plain data
    parallelism sends 2(W-1)/W. ZeRO 3 (an estimate, not checked by a test): the gradients
    reduce-scattered and the parameters all-gathered twice (forward and backward), an upper bound
    (parameters under ``stage3_param_persistence_threshold`` stay whole). Gradient calls are counted
    per bucket of ``bucket_elements`` (``run.zero_bucket_size``), all-gathers per parameter group.
    The scalar all-reduces DeepSpeed adds (overflow and norm checks, a few bytes) are left out.
    Gradients travel in fp32: bf16 autocast keeps parameters and gradients fp32
    (``amorlip.train.engine.deepspeed_config``).
    """
    sizes = [int(n) for n in group_sizes if int(n) > 0]
    if world_size <= 1 or not sizes:
        return {}
    total = sum(sizes)
    grads = total * elem_bytes
    buckets = max(1, math.ceil(total / max(1, int(bucket_elements))))
    if zero_stage == 0:
        return {DS_GRAD_ALL_REDUCE: (buckets, grads)}
    if zero_stage in (1, 2):
        align = _ZERO_ALIGNMENT * world_size
        padded = sum(math.ceil(n / align) * align for n in sizes) * elem_bytes
        return {DS_GRAD_ALL_REDUCE: (buckets, grads), DS_PARAM_ALL_GATHER: (len(sizes), padded)}
    if zero_stage == 3:
        return {DS_GRAD_REDUCE_SCATTER: (buckets, grads), DS_PARAM_ALL_GATHER: (2 * len(sizes), 2 * grads)}
    raise ValueError(f"unknown ZeRO stage {zero_stage}")


def engine_group_sizes(engine, run) -> list[int]:
    """Elements per trainable parameter group of the engine's module, as the optimizer groups them
    (``amorlip.train.engine.param_groups``); ZeRO-3's partitioned parameters by their full size."""
    from amorlip.train.engine import param_groups

    return [sum(getattr(p, "ds_numel", p.numel()) for p in group["params"] if p.requires_grad)
            for group in param_groups(engine.module, run)]


class StepAccounting:
    """Per-step averages of the counted collectives plus DeepSpeed's computed ones.

    :meth:`add_step` takes one step's :func:`take`. :meth:`window_means` gives the flat metrics of the
    steps since its last call (``comm/<kind>_calls``, ``comm/<kind>_bytes``, ``comm/bytes``: the
    total); :meth:`summary` the means over every step of this attempt, for train.json.
    """

    def __init__(self, world_size: int, deepspeed: dict[str, tuple[int, int]] | None = None):
        self.world_size = world_size
        self.deepspeed = dict(deepspeed or {})
        self._window: dict[str, list[int]] = {}
        self._window_steps = 0
        self._total: dict[str, list[int]] = {}
        self._total_steps = 0

    def add_step(self, counts: dict[str, tuple[int, int]]) -> None:
        for table in (self._window, self._total):
            for kind, (calls, nbytes) in counts.items():
                entry = table.setdefault(kind, [0, 0])
                entry[0] += calls
                entry[1] += nbytes
        self._window_steps += 1
        self._total_steps += 1

    def _per_step(self, table: dict[str, list[int]], steps: int) -> dict[str, dict[str, float]]:
        out = {k: {"calls": v[0] / steps, "bytes": v[1] / steps} for k, v in sorted(table.items())} if steps else {}
        for kind, (calls, nbytes) in sorted(self.deepspeed.items()):
            out[kind] = {"calls": float(calls), "bytes": float(nbytes)}
        return out

    def window_means(self) -> dict[str, float]:
        """Flat per-step means since the last call; empty on one rank (no collective exists there)."""
        per_step = self._per_step(self._window, self._window_steps)
        self._window, self._window_steps = {}, 0
        if self.world_size <= 1:
            return {}
        flat = {}
        for kind, figures in per_step.items():
            flat[f"comm/{kind}_calls"] = figures["calls"]
            flat[f"comm/{kind}_bytes"] = figures["bytes"]
        flat["comm/bytes"] = sum(f["bytes"] for f in per_step.values())
        return flat

    def summary(self) -> dict:
        """For train.json: per-step means by kind over this attempt's steps, and their total."""
        per_step = self._per_step(self._total, self._total_steps) if self.world_size > 1 else {}
        return {"world_size": self.world_size, "steps": self._total_steps, "per_step": per_step,
                "bytes_per_step": sum(f["bytes"] for f in per_step.values()),
                "counted": sorted(k for k in per_step if k not in self.deepspeed),
                "computed": sorted(self.deepspeed),
                "bytes": "payload per rank (all-gather: gathered output; all-reduce: buffer; reduce-scatter: input)"}

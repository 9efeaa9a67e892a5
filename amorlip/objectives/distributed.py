"""Collectives that let one rank's local batch meet the global batch.

Every objective takes an explicit ``group``: ``None`` means one process (no communication, even if a
default process group exists); a group whose world size is 1 is the same. With W > 1 ranks the local
batches must all have the same size B, and rank r holds global rows ``r*B .. r*B+B-1`` -- the row
order of ``torch.cat`` over ranks, which is how the matched pair of a local sample is located among
the global columns.

Features that need a gradient travel with :func:`gather_with_grad` (``torch.distributed.nn``'s
autograd-aware all-gather, as open_clip's ``gather_features(gather_with_grad=True)``): in the
backward pass each rank receives the sum, over all ranks' losses, of the gradient of its own
features: gradients return to their owner (docs/method.md, "Numerics").

Each helper counts what it sends with :func:`amorlip.collectives.record` (kind and payload bytes,
from shapes only), so the trainer can report a step's communication (docs/architecture.md,
"Collective accounting").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from amorlip import collectives


def world_size(group=None) -> int:
    """Number of ranks in ``group``; 1 when ``group`` is None or no process group is initialised."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    """This process's rank within ``group`` (0 for a single process)."""
    if world_size(group) == 1:
        return 0
    return dist.get_rank(group)


def row_offset(local_batch: int, group=None) -> int:
    """Global index of this rank's first row (equal local batches on every rank)."""
    return rank(group) * local_batch


def gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping autograd to every owner."""
    if world_size(group) == 1:
        return tensor
    out = torch.cat(dist_fn.all_gather(tensor.contiguous(), group=group), dim=0)
    collectives.record("all_gather", collectives.tensor_bytes(out))
    if out.requires_grad:
        # the backward sums every rank's gradient of this rank's rows: a reduce-scatter of the gathered
        # gradient (torch emulates it on gloo with one scatter per rank, the same payload); counted when
        # that gradient arrives, i.e. when the backward really runs
        out.register_hook(_count_gather_backward)
    return out


def _count_gather_backward(grad: torch.Tensor) -> None:
    collectives.record("reduce_scatter", collectives.tensor_bytes(grad))


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, detached (for no-grad targets)."""
    tensor = tensor.detach()
    if world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    out = torch.cat(parts, dim=0)
    collectives.record("all_gather", collectives.tensor_bytes(out))
    return out


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor], group=None) -> None:
    """Average ``tensors`` in place over the ranks of ``group`` (no-op for one process).

    Used for the lambda nets' gradients, so that the nets stay identical on every rank the way DDP
    would keep them (docs/variants.md, "Multi-rank").
    """
    size = world_size(group)
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    collectives.record("all_reduce", collectives.tensor_bytes(flat))
    flat.div_(size)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n

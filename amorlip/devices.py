"""Which CUDA device a process may use, decided from what the launcher and SLURM say.

Pure functions of (environment, device count), so the decisions are tested on machines without a
GPU; the callers pass ``torch.cuda.device_count()``.

- :func:`cuda_device_index`: a training rank's device. Under ``srun --gpu-bind=none`` every rank of
  a node sees all of the job's GPUs there and local rank ``i`` takes GPU ``i``; where a cluster binds
  one GPU per task anyway (``--gpus-per-task``, a site default, per-task device cgroups) each rank
  sees one device, numbered 0, and ``cuda:<local rank>`` would fail with "invalid device ordinal".
- :func:`eval_device`: an evaluation job's device. A GPU merely *visible* is not a GPU the job
  holds: on a cluster without device confinement a CPU-only job sees every GPU of its node, and
  using one would land on another job's GPU. So inside a SLURM job the GPUs must be allocated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Values SLURM or users put in CUDA_VISIBLE_DEVICES to mean "no GPU"
_NO_DEVICES = ("", "-1", "none", "nodevfiles", "void")

# SLURM variables that say the job holds GPUs: id lists (the GPUs on this node), counts
# ([type:]count, comma-separated per type) and task TRES strings (gres/gpu entries only)
_SLURM_GPU_ID_LISTS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
_SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK")
_SLURM_TRES = ("SLURM_TRES_PER_TASK",)


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA ordinal for ``local_rank`` among ``device_count`` visible devices.

    ``local_rank % device_count``: ``local_rank`` itself when the rank sees every GPU of its node,
    0 when the cluster shows each rank only its own GPU. Raises when no device is visible, since a
    CUDA rank without a device is a launch error, not something to paper over.
    """
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    if device_count < 1:
        raise ValueError(f"no CUDA device visible to local rank {local_rank}")
    return local_rank % device_count


def _count(token: str) -> int:
    """``a100:4`` / ``gpu=4`` / ``4`` -> 4; a bare type name counts as 1."""
    last = token.replace("=", ":").rsplit(":", 1)[-1].strip()
    return int(last) if last.isdigit() else 1


def _gpus_named(name: str, value: str) -> int:
    """How many GPUs SLURM variable ``name`` names (0 when unset or empty)."""
    parts = [p.strip() for p in value.split(",") if p.strip() and p.strip().lower() not in _NO_DEVICES]
    if name in _SLURM_GPU_ID_LISTS:
        return len(parts)
    if name in _SLURM_TRES:
        return sum(_count(p) for p in parts if "gpu" in p)
    return sum(_count(p) for p in parts)


def slurm_gpus_allocated(env: Mapping[str, str] | None = None) -> int | None:
    """GPUs SLURM allocated to this job (on this node where it says), None outside a SLURM job."""
    env = os.environ if env is None else env
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")):
        return None
    names = (*_SLURM_GPU_ID_LISTS, *_SLURM_GPU_COUNTS, *_SLURM_TRES)
    return max(_gpus_named(name, env.get(name, "")) for name in names)


def eval_device(env: Mapping[str, str] | None = None, cuda_device_count: int = 0) -> str:
    """``"cuda:0"`` or ``"cpu"`` for an evaluation process.

    - CUDA_VISIBLE_DEVICES naming no device ("", -1, NoDevFiles): cpu;
    - inside a SLURM job: cuda only if the job holds GPUs (SLURM sets CUDA_VISIBLE_DEVICES to them,
      so ordinal 0 is the first of the job's own); a job without GPUs on a node that shows them
      evaluates on the CPU;
    - elsewhere (a workstation): cuda whenever a device is visible.
    """
    env = os.environ if env is None else env
    if cuda_device_count < 1:
        return "cpu"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() in _NO_DEVICES:
        return "cpu"
    allocated = slurm_gpus_allocated(env)
    if allocated is not None and allocated < 1:
        return "cpu"
    return "cuda:0"


def enable_tf32() -> None:
    """TF32 tensor-core matmuls and convolutions for inference (evaluation).

    Zero-shot scores are argmax and ranking decisions over cosine similarities. TF32 rounds the
    matmul inputs to a 10-bit mantissa (accumulating in fp32), which perturbs a similarity by about
    1e-3 relative and can only reorder near-ties, while it makes fp32 matmuls several times faster
    on Ampere and later GPUs. Training does not call this.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

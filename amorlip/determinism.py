"""The ``deterministic: true`` run setting: torch's deterministic algorithms, for bit-identical GPU reruns.

On CPU a run is already a function of its config, seed and data (the loader's order depends only on
sample keys and the seed, see amorlip/data/reshard.py); the kernels torch uses there give the same
bits for the same inputs and thread count. On GPU they do not by default: cuDNN picks convolution
algorithms by timing them (``benchmark``), cuBLAS splits some reductions by workspace
availability, and ``index_add_`` / ``scatter_add_`` / ``index_put_(accumulate=True)`` and the
backward passes of ``gather`` and indexing add with atomics in whatever order the threads arrive.
:func:`apply_determinism` switches those to fixed-order implementations, and makes an op that has
none (e.g. some pooling and interpolation backward passes on CUDA) raise, naming the op, instead of
silently varying. What it cannot fix
(NCCL's reduction order across ranks and nodes, different GPU models or library versions) is listed
in docs/architecture.md.

``CUBLAS_WORKSPACE_CONFIG`` is read by cuBLAS when it creates its handle, i.e. at the first matmul
on the device: call :func:`apply_determinism` before the model moves to the GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# cuBLAS's documented settings for reproducible results (one 4 MiB workspace x 8, or 16 KiB x 8)
CUBLAS_WORKSPACE = ":4096:8"
_VALID_WORKSPACES = (":4096:8", ":16:8")


def apply_determinism(run: Any) -> dict[str, Any]:
    """Turn on deterministic algorithms when ``run.deterministic`` is true; return what was set.

    Sets ``CUBLAS_WORKSPACE_CONFIG`` (unless already one of cuBLAS's reproducible values),
    ``torch.use_deterministic_algorithms(True)``, ``cudnn.deterministic = True`` and
    ``cudnn.benchmark = False``. With ``run.deterministic`` false nothing is changed. The returned
    dict (``deterministic``, ``cublas_workspace_config``, ``cudnn_benchmark``) is meant for
    train.json and the tracker.
    """
    if not getattr(run, "deterministic", False):
        return {"deterministic": False}
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current not in _VALID_WORKSPACES:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            log.warning("deterministic: CUDA is already initialised; CUBLAS_WORKSPACE_CONFIG=%s may come too "
                        "late for the cuBLAS handle (apply the setting before the model moves to the GPU)",
                        CUBLAS_WORKSPACE)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    settings = {"deterministic": True,
                "cublas_workspace_config": os.environ["CUBLAS_WORKSPACE_CONFIG"],
                "cudnn_benchmark": torch.backends.cudnn.benchmark}
    log.info("deterministic algorithms on (%s)", ", ".join(f"{k}={v}" for k, v in settings.items()))
    return settings

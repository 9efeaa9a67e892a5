"""``runs/{run}/model.pt``: the exported model's file format, its one writer and its one reader.

Training writes it (``amorlip export``, :mod:`amorlip.train.export`) and evaluation and diagnostics
read it; the format lives here, beside the models, so that neither side imports the other.

Why a file of its own instead of pointing evaluation at the DeepSpeed directory: ZeRO shards the
optimizer (and under stage 3 the weights) per rank, and DeepSpeed loads its files with
``weights_only=False``. ``model.pt`` holds only tensors and plain types, loads with
``torch.load(path, weights_only=True)`` and restores a stock open_clip model::

    {"format": "amorlip-model/1", "model_name", "model_config" (open_clip cfg), "model_kwargs",
     "state_dict" (fp32), "run" (run config), "lambda_nets" ({"image", "text"} EMA nets | None),
     "step", "checkpoint_tag", "method", "variant"}

``open_clip.CLIP(**model_config, **model_kwargs)`` (or ``open_clip.create_model(model_name)`` once the
config is registered) + ``load_state_dict(state_dict)`` gives the trained towers.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from amorlip.fileio import atomic_path

FORMAT = "amorlip-model/1"


class ModelFileError(ValueError):
    """A ``model.pt`` that ``amorlip export`` did not write (truncated, replaced, another format)."""


def write_model_file(path: str | os.PathLike, *, model_name: str, model_config: dict, model_kwargs: dict,
                     state_dict: dict[str, torch.Tensor], run: dict, lambda_nets: dict | None, step: int,
                     checkpoint_tag: str, method: str, variant: str) -> dict[str, Any]:
    """Write ``path`` atomically in :data:`FORMAT` and return the payload.

    The finished temporary file is read back with ``weights_only=True`` before it replaces ``path``:
    a file that fails the format's one promise is never shipped.
    """
    payload = {
        "format": FORMAT,
        "model_name": model_name,
        "model_config": model_config,
        "model_kwargs": model_kwargs,
        "state_dict": {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()},
        "run": run,
        "lambda_nets": lambda_nets,
        "step": int(step),
        "checkpoint_tag": checkpoint_tag,
        "method": method,
        "variant": variant,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)
    return payload


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """``model.pt``'s payload, or :class:`ModelFileError` saying what the file is and how to redo it.

    ``torch.save`` writes a zip archive; anything else would reach torch's legacy pickle reader,
    whose errors (``KeyError: 101`` for a text file) say nothing useful, so it is refused first.
    """
    path = Path(path)
    redo = "delete it and rerun the export (snakemake reruns it; or `amorlip export --config C --run R`)"
    if not path.is_file():
        raise ModelFileError(f"{path} not found; {redo}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a model file written by `amorlip export` (not a torch zip "
                             f"archive: {path.stat().st_size} bytes of something else); {redo}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged archive or a foreign pickle
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelFileError(f"{path} is damaged or not an amorlip model file ({type(exc).__name__}: {first}); "
                             f"never load it with weights_only=False; {redo}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not an amorlip model file (format {found!r}, expected {FORMAT}); {redo}")
    return payload


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``model.pt`` -> ``(model in eval mode, preprocess_val, tokenizer, meta)`` for evaluation.

    ``meta`` is the file's content without the state dict (run config, lambda nets, step, ...).
    """
    from amorlip.model_names import known_model_names
    from amorlip.models import create_model, get_tokenizer

    payload = read_model_file(path)
    name = payload["model_name"]
    kwargs = payload.get("model_kwargs") or {}
    if name in known_model_names():
        model, _, preprocess_val = create_model(name, siglip_init_bias=kwargs.get("init_logit_bias"))
    else:  # a config this installation does not ship: build from the stored architecture
        import open_clip

        cfg = payload["model_config"]
        model = open_clip.CLIP(**cfg, output_dict=True, **kwargs)
        preprocess_val = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.to(device).eval()
    tokenizer = get_tokenizer(name) if name in known_model_names() else None
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-B-32")
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, preprocess_val, tokenizer, meta

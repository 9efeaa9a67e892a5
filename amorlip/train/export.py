"""``amorlip export``: the newest complete checkpoint -> ``runs/{run}/model.pt`` (plain open_clip weights).

The file's format, its writer and its reader live beside the models (:mod:`amorlip.model_file`); this
module rebuilds the fp32 weights and the task state from a DeepSpeed checkpoint and hands them over.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from amorlip.config import RunConfig, get_run
from amorlip.model_file import FORMAT, write_model_file

log = logging.getLogger(__name__)


def _zero_stage_files(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")) or any(tag_dir.glob("zero_pp_rank_*_model_states.pt"))


def consolidated_state_dict(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of ``tag``: rebuilt from the ZeRO master partitions (stages 1-3), else the module."""
    from amorlip.distributed import prepare_deepspeed_cpu

    prepare_deepspeed_cpu()
    tag_dir = Path(ckpt_dir) / tag
    if _zero_stage_files(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO stage 0: the module states are the weights
        state = _model_states(tag_dir)["module"]
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def _model_states(tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's model-states file of rank 0 (it carries the client state); ZeRO-3 names it
    ``zero_pp_rank_0_mp_rank_00_model_states.pt``. It holds tensors and plain types only (ZeRO 0-3; only
    the ZeRO optimizer files need weights_only=False), so it loads without running pickled code."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).exists():
            return torch.load(tag_dir / name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no DeepSpeed model states in {tag_dir}")


def client_state(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Any]:
    """The trainer's client state of ``tag`` (position, task state, run config)."""
    states = _model_states(Path(ckpt_dir) / tag)
    skip = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
            "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version", "param_shapes",
            "frozen_param_shapes", "shared_params", "buffer_names", "frozen_param_fragments",
            "data_sampler", "random_ltd", "sparse_tensor_module_names"}
    return {k: v for k, v in states.items() if k not in skip}


def _lambda_nets(run: RunConfig, model, task_state: dict | None) -> dict | None:
    """The EMA lambda nets through the task's own contract (``lambda_nets_state``)."""
    if run.method != "amorlip" or not task_state:
        return None
    from amorlip.models import model_config
    from amorlip.tasks import build_task

    embed_dim = model_config(run.model)["embed_dim"]
    task = build_task(run, model, embed_dim, "cpu")
    task.load_state_dict(task_state)
    return task.lambda_nets_state()


def export(config: dict, run_name: str, out: str | os.PathLike | None = None) -> Path:
    """Write ``runs/{run}/model.pt`` from the newest complete checkpoint; returns its path."""
    from amorlip.models import create_model, model_config
    from amorlip.train.checkpoint import latest_complete_tag, verify_checkpoint

    run = get_run(config, run_name)
    run_dir = Path(config["paths"]["runs"]) / run_name
    ckpt_dir = run_dir / "checkpoints"
    tag = latest_complete_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}; train the run first "
                                f"(amorlip train --config ... --run {run_name})")
    # the ZeRO optimizer files unpickle with weights_only=False: only files this trainer wrote (their
    # sha256 is in the completion marker) are opened
    verify_checkpoint(ckpt_dir, tag)
    weights = consolidated_state_dict(ckpt_dir, tag)
    extra = client_state(ckpt_dir, tag)
    kwargs = {"init_logit_bias": float(run.siglip_init_bias)} if "logit_bias" in weights else {}
    model, _, _ = create_model(run.model, siglip_init_bias=kwargs.get("init_logit_bias"))
    # the trainer holds 0-dim parameters as [1] (engine.scalar_params_to_1d): back to open_clip's shapes
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v
               for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise RuntimeError(f"checkpoint {tag} does not match model {run.model}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    out = Path(out) if out is not None else run_dir / "model.pt"
    payload = write_model_file(
        out, model_name=run.model, model_config=model_config(run.model), model_kwargs=kwargs,
        state_dict=model.state_dict(), run=json.loads(json.dumps(run.to_dict())),
        lambda_nets=_lambda_nets(run, model, extra.get("task")),
        step=int(extra.get("position", {}).get("steps_done", -1)), checkpoint_tag=tag, method=run.method,
        variant=run.variant)
    log.info("exported %s (step %d, %s) -> %s", run_name, payload["step"], tag, out)
    log_export(config, run_name, out, payload["step"],
               {k: payload[k] for k in ("model_name", "model_config", "model_kwargs")})
    return out


def log_export(config: dict, run_name: str, path: Path, step: int, architecture: dict | None = None) -> None:
    """``model.pt`` as an artifact of the run's training run (``model/model.pt``), with its step, and
    as an MLflow logged model (named after the run) that the training run lists as its output, with
    ``architecture`` (``model_name``, ``model_config``, ``model_kwargs``) as its open_clip config, so
    it loads back from the store alone; registered under ``mlflow.register_model`` when that is set."""
    from amorlip.tracking import attach_run, train_run_id

    offline = Path(config["paths"]["results"]) / "mlflow-offline" / f"train-export-{run_name}.jsonl"
    tracker = attach_run(config, train_run_id(config, run_name), offline)
    if tracker is not None:
        tracker.log_artifact(path, "model")
        tracker.set_tags({"amorlip.model_artifact": "model/model.pt", "amorlip.model_step": step})
        arch = architecture or {}
        open_clip_config = None if not arch else {"model_name": arch.get("model_name"),
                                                  "model_cfg": arch.get("model_config"),
                                                  "model_kwargs": arch.get("model_kwargs") or {}}
        tracker.log_model(path, run_name, step=step,
                          params={"format": FORMAT, "step": step, **({"model_name": arch["model_name"]} if arch else {})},
                          open_clip_config=open_clip_config, register_as=config["mlflow"].get("register_model"))


"""One encoder step as training runs it: the task's forward, DeepSpeed's backward and step, the clamp.

:meth:`amorlip.train.loop.Trainer._step` calls :func:`encoder_step` with what only a training job
adds between the forward and the update (the all-reduced stop / non-finite / divergence flags and the
temperature-lr rule, its ``before_update``); the task tests (tests/test_tasks.py,
tests/test_fastclip.py) call the same function on a one-rank DeepSpeed engine, so the step they
check is the step that ships: DeepSpeed's gradient clipping (``run.grad_clip``), the trainer's AdamW
groups (:func:`amorlip.train.engine.param_groups`) and the clamp of every logit-scale copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from amorlip.train.engine import clamp_logit_scale_after_step


def encoder_step(task, engine, images: torch.Tensor, texts: torch.Tensor, step_in_epoch: int,
                 indices: torch.Tensor | None = None,
                 before_update: Callable[[dict], None] | None = None) -> dict:
    """Forward ``task`` (whose ``model`` is ``engine``), then update the encoders; returns the task's output.

    ``indices`` (the batch's dense data-set indices) reach the tasks that ask for them
    (``task.needs_indices``: FastCLIP's per-sample u). ``before_update(out)`` runs after the forward
    and before the backward; it may raise to stop the step before anything changes.
    """
    extra = {"indices": indices} if getattr(task, "needs_indices", False) else {}
    out = task.training_forward(images, texts, step_in_epoch, **extra)
    if before_update is not None:
        before_update(out)
    engine.backward(out["loss"])
    engine.step()
    clamp_logit_scale_after_step(engine, task.run.max_logit_scale)
    return out

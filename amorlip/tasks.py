"""Task objects: a model plus its objective, one training step at a time (docs/architecture.md).

Shaped like open_clip's ``CLIPTask``: the trainer owns the loop, the optimizer and the engine; a
task owns what the method adds. ``task.model`` may be swapped for a DeepSpeed engine: it is only
ever called as ``self.model(images, texts)`` and must return a dict with ``image_features``,
``text_features`` (L2-normalised), ``logit_scale`` (= s) and, for SigLIP, ``logit_bias``.

The AmorLIP step follows docs/method.md, "One training step, in order" (without the encoder backward):
forward once; no-grad global targets; mix with the previous-epoch net; Stage I (lambda Adam steps on
the same, detached features); read Lambda for the encoder; EMA update; the encoder loss.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from amorlip.amortizer import LambdaState
from amorlip.config import RunConfig
from amorlip.objectives.amorlip import (
    encoder_loss,
    encoder_loss_local,
    lambda_loss,
    mix_log_targets,
    partition_targets,
    weighted_logits,
)
from amorlip.objectives.clip import as_fp32_scale, clip_loss
from amorlip.objectives.distributed import gather_no_grad, row_offset, world_size
from amorlip.objectives.fastclip import (
    fastclip_loss,
    gamma_for_epoch,
    log_batch_normalisers,
    rgcl_value,
    update_log_u,
)
from amorlip.objectives.siglip import siglip_loss
from amorlip.objectives.temperature import rescale_loss
from amorlip.schedules import beta_for_epoch, is_ema_step, is_lambda_step, is_reinit_epoch, rho_for_epoch

log = logging.getLogger(__name__)


class _Task:
    """What every method shares: the model call and the epoch bookkeeping.

    The update that follows ``training_forward`` (DeepSpeed's backward and step, the logit-scale
    clamp) is the trainer's: :func:`amorlip.train.step.encoder_step`.
    """

    method = "base"
    # True: training_forward takes ``indices`` (the batch's dense data-set indices, a CPU LongTensor)
    needs_indices = False

    def __init__(self, run: RunConfig, model: nn.Module, group=None):
        self.run = run
        self.model = model
        self.group = group
        self.epoch = 0
        self.steps_per_epoch = 0

    def _features(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        out = self.model(images, texts)
        missing = {"image_features", "text_features", "logit_scale"} - set(out)
        if missing:
            raise KeyError(f"model output lacks {sorted(missing)}; create it with output_dict=True")
        return out

    def start_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        self.epoch = epoch
        self.steps_per_epoch = steps_per_epoch

    def training_forward(self, images: torch.Tensor, texts: torch.Tensor, step_in_epoch: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def lambda_nets_state(self) -> dict | None:
        return None

    def replica_checksum(self) -> str | None:
        """A digest of the state every rank must hold identically (the lambda nets), or None."""
        return None


class ClipTask(_Task):
    """CLIP: ``clip_loss`` over global negatives, no loss rescaling."""

    method = "clip"

    def training_forward(self, images: torch.Tensor, texts: torch.Tensor, step_in_epoch: int) -> dict:
        out = self._features(images, texts)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], group=self.group)
        return {"loss": loss, "clip_loss": loss.detach(), "logit_scale": _scalar(out["logit_scale"])}


class SiglipTask(_Task):
    """SigLIP: sigmoid loss with the model's learnable logit bias."""

    method = "siglip"

    def training_forward(self, images: torch.Tensor, texts: torch.Tensor, step_in_epoch: int) -> dict:
        out = self._features(images, texts)
        if out.get("logit_bias") is None:
            raise KeyError("SigLIP needs a model with a logit bias (create_model(..., siglip_init_bias=b))")
        loss = siglip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                           out["logit_bias"], group=self.group)
        return {"loss": loss, "siglip_loss": loss.detach(), "logit_scale": _scalar(out["logit_scale"]),
                "logit_bias": _scalar(out["logit_bias"])}


class AmorlipTask(_Task):
    """AmorLIP: lambda nets amortize the log-partition functions (docs/method.md).

    ``run.amorlip.encoder_partition`` picks the variant's Lambda: ``mixed_target`` (published code,
    ``--fit_w_prev``: the mixed target Z_comb itself) or ``ema_net`` (paper Eq. 6: the EMA net,
    read after this step's lambda updates and before this step's EMA update).

    ``run.amorlip.encoder_negatives: local`` (docs/variants.md, "Local negatives") scores the local
    B x B logits only (:func:`encoder_loss_local`) and computes the gathered partition targets on
    Stage-I steps only, so a step between Stage-I updates runs no collective here. Lambda is the EMA
    net, or the prev net for the first ``local_warmup_steps`` steps of a re-init epoch after epoch 0.
    Its diagnostics ``log_target_mean``, ``lambda_gap`` and ``lambda_gap_prev`` exist on Stage-I
    steps only (the trainer averages each metric over the steps that produced it).
    """

    method = "amorlip"

    def __init__(self, run: RunConfig, model: nn.Module, embed_dim: int, device: torch.device | str,
                 group=None):
        super().__init__(run, model, group)
        am = run.amorlip
        if am.encoder_partition not in ("mixed_target", "ema_net"):
            raise ValueError(f"unknown encoder_partition {am.encoder_partition!r}")
        if am.encoder_negatives not in ("global", "local"):
            raise ValueError(f"unknown encoder_negatives {am.encoder_negatives!r}")
        if am.encoder_negatives == "local" and am.encoder_partition != "ema_net":
            raise ValueError("amorlip.encoder_negatives 'local' needs encoder_partition 'ema_net': the mixed "
                             "target contains the current global partition sum, which local negatives avoid "
                             "gathering on every step")
        self.config = am
        self.lambdas = LambdaState(
            embed_dim, hidden_factor=am.lambda_hidden_factor, lr=lambda_adam_lr(am, group),
            ema_alpha=am.ema_alpha, grad_clip=am.lambda_grad_clip, seed=run.seed, device=device, group=group,
        )
        self.beta = 0.0
        self.rho = rho_for_epoch(0, am.rho, run.epochs, am.rho_epochs)
        self.last_lambda_loss = torch.tensor(math.nan, device=device)

    def start_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        """Set beta and rho of ``epoch`` and apply the lambda life cycle once per epoch.

        After ``load_state_dict`` of a checkpoint taken inside ``epoch``, the life cycle of that epoch
        has already run and is not repeated (a mid-epoch resume continues the same nets).
        """
        super().start_epoch(epoch, steps_per_epoch)
        am = self.config
        self.beta = beta_for_epoch(epoch, am.beta_max, am.beta_epochs)
        self.rho = rho_for_epoch(epoch, am.rho, self.run.epochs, am.rho_epochs)
        if self.lambdas.lifecycle_epoch != epoch:
            self.lambdas.start_epoch(epoch, reinit=is_reinit_epoch(epoch, am.reinit_every_epochs))
        log.info("epoch %d: beta %.4f, rho %.3f", epoch, self.beta, self.rho)

    def training_forward(self, images: torch.Tensor, texts: torch.Tensor, step_in_epoch: int) -> dict:
        if self.lambdas.lifecycle_epoch is None:
            raise RuntimeError("call start_epoch(epoch, steps_per_epoch) before the first step")
        am = self.config
        p = am.pos_coef
        out = self._features(images, texts)
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        # detach point: the lambda side only ever sees these (docs/method.md, "Numerics")
        x_bar, y_bar = img.detach().float(), txt.detach().float()
        s_bar = as_fp32_scale(scale, x_bar.device).detach()

        local = am.encoder_negatives == "local"
        stage_one = is_lambda_step(step_in_epoch, am.t_online)
        # local negatives: the (gathered) partition targets exist only for Stage I
        with_targets = stage_one or not local
        prev_img, prev_txt = self.lambdas.predict("prev", x_bar, y_bar)
        if with_targets:
            log_t_img, log_t_txt = partition_targets(x_bar, y_bar, s_bar, pos_coef=p, group=self.group)
            if self.beta > 0.0:
                log_z_img = mix_log_targets(log_t_img, prev_img, self.beta)
                log_z_txt = mix_log_targets(log_t_txt, prev_txt, self.beta)
            else:
                log_z_img, log_z_txt = log_t_img, log_t_txt

        updates = 0
        if stage_one:
            pair_img = pair_txt = None
            if am.lambda_loss != "l2_log":
                with torch.no_grad():
                    pair_img, pair_txt = weighted_logits(x_bar, y_bar, s_bar, p, self.group, gather=gather_no_grad)

            def stage_one_loss(log_lambda_img: torch.Tensor, log_lambda_txt: torch.Tensor) -> torch.Tensor:
                return (lambda_loss(log_lambda_img, log_z_img, am.lambda_loss, pair_logits=pair_img,
                                    div_reg_coef=am.div_reg_coef)
                        + lambda_loss(log_lambda_txt, log_z_txt, am.lambda_loss, pair_logits=pair_txt,
                                      div_reg_coef=am.div_reg_coef))

            self.last_lambda_loss = self.lambdas.fit(x_bar, y_bar, stage_one_loss, am.t_lambda)
            updates = am.t_lambda

        # read the EMA net after this step's lambda updates and before its EMA update (paper Alg. 1 lines 7-9)
        ema_img, ema_txt = self.lambdas.predict("ema", x_bar, y_bar)
        if am.encoder_partition == "mixed_target":
            lambda_img, lambda_txt = log_z_img, log_z_txt
        elif self.uses_prev_lambda(step_in_epoch):
            lambda_img, lambda_txt = prev_img, prev_txt
        else:
            lambda_img, lambda_txt = ema_img, ema_txt
        if is_ema_step(step_in_epoch, am.t_target):
            self.lambdas.update_ema()

        if local:
            enc = encoder_loss_local(img, txt, scale, lambda_img, lambda_txt, pos_coef=p,
                                     global_batch=img.shape[0] * world_size(self.group))
        else:
            enc = encoder_loss(img, txt, scale, lambda_img, lambda_txt, pos_coef=p, group=self.group)
        loss = rescale_loss(enc, scale, self.rho) if am.scale_loss else enc

        # Diagnostics stay detached device tensors: the trainer reads them on logging steps only.
        out = {
            "loss": loss,
            "encoder_loss": enc.detach(),
            "lambda_loss": self.last_lambda_loss,
            "logit_scale": s_bar,
            "beta": self.beta,
            "rho": self.rho,
            "lambda_updates": updates,
        }
        if with_targets:
            # lambda_gap: the EMA net against what it regresses on; ~ -log Z right after each re-init.
            # lambda_gap_prev: last epoch's net (the one mixed into this epoch's targets) against the fresh
            # in-batch sums; small unless the lambda nets diverge, so it is the one to watch after epoch 0.
            out["log_target_mean"] = 0.5 * (log_z_img.mean() + log_z_txt.mean())
            out["lambda_gap"] = 0.5 * ((ema_img.mean() - log_z_img.mean()) + (ema_txt.mean() - log_z_txt.mean()))
            out["lambda_gap_prev"] = 0.5 * ((prev_img.mean() - log_t_img.mean())
                                            + (prev_txt.mean() - log_t_txt.mean()))
        return out

    def uses_prev_lambda(self, step_in_epoch: int) -> bool:
        """Local negatives: Lambda is the prev net on the first ``local_warmup_steps`` steps of a re-init epoch.

        A re-init epoch starts its EMA net from fresh weights (log lambda ~ 0, far below log Z); the
        prev net is the last epoch's trained one. Epoch 0 has no trained prev net (it is a fresh net
        too), so it reads the EMA net from the first step. Global negatives keep the variant's rule.
        """
        am = self.config
        return (am.encoder_negatives == "local" and self.epoch > 0
                and is_reinit_epoch(self.epoch, am.reinit_every_epochs)
                and step_in_epoch < am.local_warmup_steps)

    def state_dict(self) -> dict:
        return {"lambdas": self.lambdas.state_dict(), "last_lambda_loss": float(self.last_lambda_loss)}

    def load_state_dict(self, state: dict) -> None:
        self.lambdas.load_state_dict(state["lambdas"])
        self.last_lambda_loss = torch.tensor(float(state["last_lambda_loss"]), device=self.lambdas.device)

    def lambda_nets_state(self) -> dict:
        return self.lambdas.ema_state()

    def replica_checksum(self) -> str | None:
        return self.lambdas.checksum()


class FastclipTask(_Task):
    """FastCLIP-v3 (RGCL-g) and SogCLR: per-sample moving estimates u of the global-batch normalisers.

    u (log u, image and text) is kept for the whole data set on every rank, indexed by each sample's
    dense data-set index (``batch["indices"]``, see ``amorlip.data.loader.dataset_offsets``); the
    trainer calls :meth:`set_dataset_size` before the first step. Each step gathers the global batch's
    log g and indices, so every rank applies the same update ``u <- (1 - gamma) u + gamma g`` to the
    global batch's entries and u stays identical across ranks (and equal to a 1-rank run's). u is
    updated before the loss reads it (docs/variants.md, "FastCLIP").

    ``v3``: gamma follows the cosine schedule (1 in epoch 0 down to ``gamma_min``), the temperature is
    learnable with rho. ``sogclr``: constant ``gamma``, fixed temperature (s keeps its initial value:
    its gradient is an exact zero).
    """

    method = "fastclip"
    needs_indices = True

    def __init__(self, run: RunConfig, model: nn.Module, device: torch.device | str, group=None,
                 dataset_size: int | None = None):
        super().__init__(run, model, group)
        if run.variant not in ("v3", "sogclr"):
            raise ValueError(f"unknown fastclip variant {run.variant!r} (v3, sogclr)")
        self.config = run.fastclip
        self.device = torch.device(device)
        self.learn_temperature = run.variant == "v3"
        self.gamma = self._gamma(0)
        self.log_u_img: torch.Tensor | None = None
        self.log_u_txt: torch.Tensor | None = None
        if dataset_size is not None:
            self.set_dataset_size(dataset_size)

    def _gamma(self, epoch: int) -> float:
        fc = self.config
        if self.run.variant == "sogclr":
            return float(fc.gamma)
        return gamma_for_epoch(epoch, fc.gamma_min, fc.gamma_decay_epochs)

    def set_dataset_size(self, size: int) -> None:
        """Allocate u (log u = -inf: u = 0, FastCLIP's start) for ``size`` samples; kept if already that size."""
        if size < 1:
            raise ValueError(f"dataset_size must be positive, got {size}")
        if self.log_u_img is not None and self.log_u_img.numel() == size:
            return
        self.log_u_img = torch.full((size,), -math.inf, dtype=torch.float32, device=self.device)
        self.log_u_txt = torch.full((size,), -math.inf, dtype=torch.float32, device=self.device)

    def start_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        super().start_epoch(epoch, steps_per_epoch)
        self.gamma = self._gamma(epoch)
        log.info("epoch %d: fastclip gamma %.4f", epoch, self.gamma)

    def training_forward(self, images: torch.Tensor, texts: torch.Tensor, step_in_epoch: int,
                         indices: torch.Tensor | None = None) -> dict:
        if self.log_u_img is None:
            raise RuntimeError("call set_dataset_size(n) before the first step (u is stored per data-set sample)")
        if indices is None:
            raise ValueError("FastCLIP needs each sample's dense data-set index: pass indices (batch['indices'])")
        # no range check here (it would cost a host read per step): the loader derives indices from the
        # sizes.json that set_dataset_size got and refuses a shard that holds more samples than it lists
        fc = self.config
        out = self._features(images, texts)
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        s = as_fp32_scale(scale, img.device)
        s_used = s if self.learn_temperature else s.detach()
        log_g = log_batch_normalisers(img, txt, s_used, group=self.group)
        idx = indices.to(self.log_u_img.device, non_blocking=True).long()
        # the global batch's u updates: every rank applies all of them, so u stays replicated
        all_idx = gather_no_grad(idx, self.group)
        all_g_img = gather_no_grad(log_g[0].float(), self.group)
        all_g_txt = gather_no_grad(log_g[1].float(), self.group)
        with torch.no_grad():
            new_img = update_log_u(self.log_u_img[all_idx], all_g_img, self.gamma)
            new_txt = update_log_u(self.log_u_txt[all_idx], all_g_txt, self.gamma)
            self.log_u_img[all_idx] = new_img
            self.log_u_txt[all_idx] = new_txt
        rows = slice(self._row_offset(img.shape[0]), self._row_offset(img.shape[0]) + img.shape[0])
        loss = fastclip_loss(img, txt, s_used, new_img[rows], new_txt[rows], rho=fc.rho, eps=fc.eps,
                             learn_temperature=self.learn_temperature, group=self.group, log_g=log_g)
        if not self.learn_temperature:
            loss = loss + 0.0 * s  # fixed temperature: an exact zero gradient keeps every optimizer path uniform
        return {
            "loss": loss,
            "fastclip_loss": rgcl_value(log_g[0], log_g[1], s, fc.rho if self.learn_temperature else 0.0, fc.eps),
            "logit_scale": s.detach(),
            "gamma": self.gamma,
            "log_u_mean": 0.5 * (new_img.mean() + new_txt.mean()),
        }

    def _row_offset(self, local_batch: int) -> int:
        return row_offset(local_batch, self.group)

    def state_dict(self) -> dict:
        if self.log_u_img is None:
            return {}
        return {"log_u_img": self.log_u_img.detach().cpu().clone(), "log_u_txt": self.log_u_txt.detach().cpu().clone(),
                "gamma": float(self.gamma)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        size = state["log_u_img"].numel()
        if self.log_u_img is not None and self.log_u_img.numel() != size:
            raise ValueError(f"checkpoint holds u for {size} samples, the data set has {self.log_u_img.numel()}: "
                             "resume on the same data")
        self.log_u_img = state["log_u_img"].to(self.device, torch.float32).clone()
        self.log_u_txt = state["log_u_txt"].to(self.device, torch.float32).clone()
        self.gamma = float(state["gamma"])


def lambda_adam_lr(am, group=None) -> float:
    """The lambda nets' Adam lr: ``lambda_lr``, times the world size under ``lambda_lr_scaling: world_size``.

    ``batch_size`` here is the global batch, so W ranks compute exactly the 1-rank gradient (their
    all-reduced mean) and ``none`` keeps a run's math independent of how many GPUs it uses. The
    authors multiply by W because their batch is per GPU (W GPUs = a W times larger batch, the linear
    scaling rule); ``world_size`` reproduces their code's lr for a command ported with its per-GPU batch.
    """
    scale = world_size(group) if am.lambda_lr_scaling == "world_size" else 1
    return am.lambda_lr * scale


def _scalar(value) -> torch.Tensor | float:
    """A detached fp32 scalar tensor (or the float given): what a step reports without a host read."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(-1)[0]
    return float(value)


def build_task(run: RunConfig, model: nn.Module, embed_dim: int, device: torch.device | str,
               group=None) -> _Task:
    """The task of ``run.method`` around ``model``; ``group`` is the process group of the global batch."""
    if run.method == "clip":
        return ClipTask(run, model, group)
    if run.method == "siglip":
        return SiglipTask(run, model, group)
    if run.method == "amorlip":
        return AmorlipTask(run, model, embed_dim, device, group)
    if run.method == "fastclip":
        return FastclipTask(run, model, device, group)
    raise ValueError(f"unknown method {run.method!r} (clip, siglip, amorlip, fastclip)")

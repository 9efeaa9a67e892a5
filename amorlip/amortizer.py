"""Lambda networks (the amortized log-partition functions), their EMA and their per-epoch life cycle.

Per modality there are three nets (docs/method.md, "The lambda nets' life cycle per epoch"):
- ``online``: trained in Stage I by Adam on detached features against the detached (mixed) target;
- ``ema``: the target net of paper Eq. 11, ``theta_hat <- alpha theta_hat + (1 - alpha) theta``;
- ``prev``: a frozen copy of the EMA net at the end of the previous epoch, mixed into the targets
  (paper Eq. 12).

At the start of every epoch (paper Alg. 1 line 4), in this order: prev <- EMA;
then, on re-init epochs, the online nets get fresh random weights, EMA <- online, and a fresh Adam
(lr: ``amorlip.tasks.lambda_adam_lr``). The fresh weights come from a generator seeded by
(seed, epoch, modality), so a resumed run re-creates the same nets.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from amorlip.objectives.distributed import all_reduce_mean_

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")


class LambdaNet(nn.Module):
    """Residual MLP ``psi -> log lambda(psi)`` exactly as the authors' ``ResidualMLP`` (paper Sec. 3.3).

    a = LN_h(ReLU(W1 x)); b = LN_d(ReLU(W2 a)); c = ReLU(b + x); out = W3 c (squeezed to ``[B]``).
    Positivity of lambda comes from reading the output as a log: no softplus, no clamp.
    Inputs are detached and the forward runs in fp32 with autocast disabled (docs/method.md, "Numerics").
    Initialisation is PyTorch's default (Kaiming-uniform Linear, LayerNorm (1, 0)), drawn from
    ``generator`` when given, without touching the global RNG.
    """

    def __init__(self, dim: int, hidden_factor: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        hidden = int(hidden_factor * dim)
        if hidden < 1:
            raise ValueError(f"hidden width int({hidden_factor} * {dim}) must be >= 1")
        # meta first: no default init draws from the global RNG before reset_parameters does its own
        self.fc_in = nn.Linear(dim, hidden, device="meta")
        self.norm_hidden = nn.LayerNorm(hidden, device="meta")
        self.fc_out = nn.Linear(hidden, dim, device="meta")
        self.norm_out = nn.LayerNorm(dim, device="meta")
        self.head = nn.Linear(dim, 1, device="meta")
        self.to_empty(device=device or "cpu")
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default initialisation, drawn on the CPU from ``generator`` (or the global RNG)."""
        for linear in (self.fc_in, self.fc_out, self.head):
            weight = torch.empty(linear.weight.shape)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(linear.in_features)
            bias = torch.empty(linear.bias.shape).uniform_(-bound, bound, generator=generator)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        for norm in (self.norm_hidden, self.norm_out):
            norm.reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.detach().float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = self.norm_hidden(torch.relu(self.fc_in(x)))
            b = self.norm_out(torch.relu(self.fc_out(a)))
            c = torch.relu(b + x)
            return self.head(c).squeeze(-1)


@torch.no_grad()
def ema_update_(ema: nn.Module, online: nn.Module, alpha: float) -> None:
    """``theta_hat <- alpha theta_hat + (1 - alpha) theta`` on parameters and float buffers (Eq. 11).

    Non-float buffers are copied, as the authors' ``EMA`` class updates parameters *and* buffers.
    """
    for target, source in zip(ema.parameters(), online.parameters()):
        target.mul_(alpha).add_(source.detach(), alpha=1.0 - alpha)
    for target, source in zip(ema.buffers(), online.buffers()):
        if target.is_floating_point():
            target.mul_(alpha).add_(source, alpha=1.0 - alpha)
        else:
            target.copy_(source)


def init_seed(seed: int, epoch: int, modality: str) -> int:
    """A 63-bit seed for the lambda net of ``modality`` re-initialised at ``epoch`` of run ``seed``."""
    digest = hashlib.sha256(f"amorlip-lambda/{seed}/{epoch}/{modality}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _frozen(net: nn.Module) -> nn.Module:
    net.requires_grad_(False)
    return net.eval()


class LambdaState:
    """The lambda nets of both modalities (online, EMA, prev), their Adam and their life cycle.

    ``lr`` is the Adam lr (the task resolves ``lambda_lr`` and its optional world-size scaling). One
    Adam and one gradient-norm clip cover both modalities, as the authors' single ``LambdaMLPs``
    module does. With a group of W > 1 ranks the nets are one model across ranks: they start
    identical (weights drawn from the run seed, the same on every rank), their gradients are
    all-reduced (mean) before clipping, so every Adam step, every EMA update and every per-epoch life
    cycle is the same computation on every rank. :meth:`checksum` lets the trainer verify that at
    every checkpoint.
    """

    def __init__(self, dim: int, hidden_factor: float = 1.0, lr: float = 1e-3, ema_alpha: float = 0.92,
                 grad_clip: float | None = 1.0, seed: int = 0, device: torch.device | str = "cpu",
                 group=None):
        self.dim = dim
        self.hidden_factor = hidden_factor
        self.lr = lr
        self.ema_alpha = ema_alpha
        self.grad_clip = grad_clip
        self.seed = seed
        self.device = torch.device(device)
        self.group = group
        # before the first epoch (Alg. 1 line 2): online from the seed's "epoch -1" stream, EMA = prev = copy
        self.online = nn.ModuleDict({m: self._new_net(-1, m) for m in MODALITIES})
        self.ema = nn.ModuleDict({m: _frozen(self._new_net(-1, m)) for m in MODALITIES})
        self.prev = nn.ModuleDict({m: _frozen(self._new_net(-1, m)) for m in MODALITIES})
        self.optimizer = self._new_optimizer()
        self.lifecycle_epoch: int | None = None

    def _new_net(self, epoch: int, modality: str) -> LambdaNet:
        generator = torch.Generator().manual_seed(init_seed(self.seed, epoch, modality))
        return LambdaNet(self.dim, self.hidden_factor, generator=generator, device=self.device)

    def _new_optimizer(self) -> torch.optim.Adam:
        # foreach: one multi-tensor kernel per update instead of a Python loop over ~20 small tensors,
        # which dominated the lambda step's cost on CPU (benchmarks/step_time.py)
        return torch.optim.Adam(self.online.parameters(), lr=self.lr, foreach=True)

    def start_epoch(self, epoch: int, reinit: bool = True) -> None:
        """Per-epoch life cycle (paper Alg. 1 line 4), in the order docs/method.md gives.

        prev <- copy(EMA) first (the net trained during the last epoch); then, if ``reinit``: online
        <- fresh random weights (seeded by (seed, epoch)), EMA <- copy(new online), fresh Adam.
        """
        self.prev.load_state_dict(self.ema.state_dict())
        if reinit:
            for modality in MODALITIES:
                generator = torch.Generator().manual_seed(init_seed(self.seed, epoch, modality))
                self.online[modality].reset_parameters(generator)
            self.ema.load_state_dict(self.online.state_dict())
            self.optimizer = self._new_optimizer()
        self.lifecycle_epoch = epoch
        log.debug("lambda nets: epoch %d life cycle applied (reinit=%s)", epoch, reinit)

    @torch.no_grad()
    def predict(self, which: str, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log lambda_image [B], log lambda_text [B])`` of the ``online``, ``ema`` or ``prev`` nets."""
        nets = {"online": self.online, "ema": self.ema, "prev": self.prev}[which]
        return nets["image"](img), nets["text"](txt)

    def fit(self, img: torch.Tensor, txt: torch.Tensor,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], iterations: int) -> float:
        """Stage I: ``iterations`` Adam steps of ``loss_fn(log_lambda_image, log_lambda_text)``.

        Features are detached inside the nets, so no lambda gradient reaches the encoders. Gradients
        are averaged over ranks, clipped (joint norm over both modalities), stepped, and cleared at
        the end so no stale lambda gradient survives into the encoder step. Returns the loss of the
        last iteration (before its step) as a detached tensor: reading it would stall a GPU.
        """
        last = torch.tensor(float("nan"), device=self.device)
        params = list(self.online.parameters())
        for _ in range(iterations):
            loss = loss_fn(self.online["image"](img), self.online["text"](txt))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            all_reduce_mean_(grads, self.group)
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
            last = loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        return last

    def update_ema(self) -> None:
        for modality in MODALITIES:
            ema_update_(self.ema[modality], self.online[modality], self.ema_alpha)

    def ema_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The EMA nets' state dicts (what the export stores as ``lambda_nets``)."""
        return {m: {k: v.detach().cpu().clone() for k, v in self.ema[m].state_dict().items()}
                for m in MODALITIES}

    def checksum(self) -> str:
        """sha256 over every net (online, EMA, prev) and the Adam state, in a fixed order.

        Equal on every rank while the nets are one model; the trainer compares it across ranks at
        every checkpoint. Reads the device (call it at checkpoints, not per step).
        """
        digest = hashlib.sha256()
        for name, nets in (("online", self.online), ("ema", self.ema), ("prev", self.prev)):
            for m in MODALITIES:
                for key, value in sorted(nets[m].state_dict().items()):
                    digest.update(f"{name}/{m}/{key}".encode())
                    digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        for index, state in sorted(self.optimizer.state_dict()["state"].items()):
            for key, value in sorted(state.items()):
                digest.update(f"adam/{index}/{key}".encode())
                if isinstance(value, torch.Tensor):
                    digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
                else:
                    digest.update(repr(value).encode())
        return digest.hexdigest()

    def state_dict(self) -> dict:
        """Plain tensors/dicts/lists/numbers only: loads with ``torch.load(weights_only=True)``."""
        def nets(d: nn.ModuleDict) -> dict:
            return {m: {k: v.detach().cpu().clone() for k, v in d[m].state_dict().items()} for m in MODALITIES}

        return {
            "online": nets(self.online),
            "ema": nets(self.ema),
            "prev": nets(self.prev),
            "optimizer": self.optimizer.state_dict(),
            "lifecycle_epoch": -1 if self.lifecycle_epoch is None else int(self.lifecycle_epoch),
            "lr": float(self.lr),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, nets in (("online", self.online), ("ema", self.ema), ("prev", self.prev)):
            for m in MODALITIES:
                nets[m].load_state_dict(state[name][m])
        self.lr = float(state["lr"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        epoch = int(state["lifecycle_epoch"])
        self.lifecycle_epoch = None if epoch < 0 else epoch

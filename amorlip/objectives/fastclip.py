"""FastCLIP-v3's objective: the robust global contrastive loss with a global learnable temperature (RGCL-g).

FastCLIP (arXiv 2407.01445, Sec. 3 and App. on RGCL-g) minimises, over the encoder weights w and
the temperature tau = 1/s,

    F(w, tau) = 1/n sum_i tau * [ log(eps + g1_i(w, tau)) + log(eps + g2_i(w, tau)) ] + 2 rho tau,
    g1_i = mean_{j in S_i^-} exp((x_i.y_j - x_i.y_i) / tau),   g2_i = mean_{j in S_i^-} exp((y_i.x_j - y_i.x_i) / tau),

where S_i^- are the negatives of pair i (all other samples of the data set). A mini-batch estimates
g1_i by the mean over the other ``N - 1`` samples of the global batch (``log_batch_normalisers``), and
a per-sample moving estimate u_i, kept for the whole data set, tracks it:
``u_i <- (1 - gamma) u_i + gamma g_i(B)`` (``update_log_u``), applied before the gradient is formed.
The compositional gradient replaces 1/(eps + g_i) by 1/(eps + u_i), and log(eps + g_i) by log u_i:

    d/dw   : 1/|B| sum_i tau / (eps + u_i) * d g_i(B) / dw
    d/dtau : 1/|B| sum_i [ log u_i + tau / (eps + u_i) * d g_i(B) / dtau ] + 2 rho.

This is the authors' estimator (``FastCLIPLoss.forward`` in <https://github.com/Optimization-AI/fast_clip>,
``--multiply_tau``): their temperature gradient takes ``log(u)`` without eps (the paper's objective
would give log(eps + u); the two differ only where u < ~100 eps, i.e. for pairs whose negatives all
sit more than ~30 / s below the positive). docs/method.md, "FastCLIP", maps every flag.

``fastclip_loss`` is a surrogate whose autograd gradient is exactly this (halved: the two directions
are averaged, as ``clip_loss`` averages its two cross-entropies, so rho / s here is the paper's 2 rho tau
over two), computed in log space and fp32: u is stored as log u, g_i(B) as a log-sum-exp, and the
ratio g_i / (eps + u_i) is at most 1 / gamma because u is updated with g_i(B) first.

With a fixed temperature (SogCLR, ``learn_temperature=False``) s is detached: the same w-gradient,
no gradient to the logit scale.
"""

from __future__ import annotations

import math

import torch

from amorlip.objectives.clip import as_fp32_scale
from amorlip.objectives.distributed import gather_with_grad, row_offset

DEFAULT_EPS = 1e-14


def gamma_for_epoch(epoch: int, gamma_min: float, decay_epochs: int) -> float:
    """FastCLIP's cosine inner-lr schedule: 1 in epoch 0, down to ``gamma_min`` at ``decay_epochs``, then flat.

    ``gamma = gamma_min + (1 - gamma_min) * (1 + cos(pi * min(epoch, E) / E)) / 2`` with E = ``decay_epochs``.
    """
    if decay_epochs <= 0:
        return float(gamma_min)
    t = min(epoch, decay_epochs) / decay_epochs
    return float(gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * t)))


def log_batch_normalisers(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float,
                          group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log g1_i(B), log g2_i(B) of the local rows against the global batch, fp32, with autograd.

    ``log g1_i = logsumexp_{j != i} s (x_i.y_j - x_i.y_i) - log(N - 1)`` (N: global batch), g2 likewise
    with images and texts swapped. Columns are gathered with their gradient, as in ``clip_loss``.
    """
    batch = img.shape[0]
    all_img = gather_with_grad(img, group).float()
    all_txt = gather_with_grad(txt, group).float()
    n = all_img.shape[0]
    if n < 2:
        raise ValueError("FastCLIP needs a global batch of at least 2 samples (a pair needs a negative)")
    x, y = img.float(), txt.float()
    s = as_fp32_scale(logit_scale, x.device)
    rows = torch.arange(batch, device=x.device)
    cols = rows + row_offset(batch, group)
    pos = (x * y).sum(dim=1, keepdim=True)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    mask[rows, cols] = True
    neg_inf = torch.tensor(-math.inf, device=x.device)
    diff_img = torch.where(mask, neg_inf, s * (x @ all_txt.T - pos))
    diff_txt = torch.where(mask, neg_inf, s * (y @ all_img.T - pos))
    log_norm = math.log(n - 1)
    return (torch.logsumexp(diff_img, dim=1) - log_norm, torch.logsumexp(diff_txt, dim=1) - log_norm)


@torch.no_grad()
def update_log_u(log_u: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
    """``log((1 - gamma) u + gamma g)`` in log space; a never-visited entry (u = 0: log u = -inf) takes g.

    The first-visit rule is the authors' (``FastCLIPLoss.local`` in Optimization-AI/fast_clip resets a u
    that is 0, inf or nan to g whenever gamma < 1; libauc's ``GCLoss`` does the same with gamma = 1 for
    an unvisited batch): without it a sample first seen in an epoch with gamma < 1 starts at gamma * g,
    an estimate too small by 1 / gamma whose ratio g / u inflates its gradient until it decays.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    log_g = log_g.detach().float()
    if gamma == 1.0:
        return log_g.clone()
    log_u = log_u.float()
    mixed = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))
    unvisited = torch.isneginf(log_u) | torch.isnan(log_u)
    return torch.where(unvisited, log_g, mixed)


def log_eps_plus(log_u: torch.Tensor, eps: float) -> torch.Tensor:
    """log(eps + u) from log u."""
    if eps <= 0.0:
        return log_u.float()
    return torch.logaddexp(log_u.float(), torch.full_like(log_u.float(), math.log(eps)))


def fastclip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float,
                  log_u_img: torch.Tensor, log_u_txt: torch.Tensor, *, rho: float = 0.0,
                  eps: float = DEFAULT_EPS, learn_temperature: bool = True, group=None,
                  log_g: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The RGCL-g surrogate of the local rows (mean over them; see the module docstring), fp32.

    ``log_u_img``, ``log_u_txt``: ``[B]`` log u of the local rows, already updated with this batch.
    ``log_g``: :func:`log_batch_normalisers` of the same inputs, if already computed (keeps its graph).
    ``learn_temperature``: False detaches s (SogCLR's fixed temperature; ``rho`` is then unused).
    Value: ``tau_sg * mean_i (r1_i + r2_i) / 2 + tau * mean_i (log u1_i + log u2_i) / 2 + rho tau``
    with ``r_i = g_i(B) / sg(eps + u_i)``; under DDP's 1/W averaging the gradient is the global-batch one.
    """
    s = as_fp32_scale(logit_scale, img.device)
    if not learn_temperature:
        s = s.detach()
    if log_g is None:
        log_g = log_batch_normalisers(img, txt, s, group)
    log_g_img, log_g_txt = log_g
    den_img = log_eps_plus(log_u_img.detach(), eps)
    den_txt = log_eps_plus(log_u_txt.detach(), eps)
    ratio = 0.5 * (torch.exp(log_g_img - den_img) + torch.exp(log_g_txt - den_txt)).mean()
    tau_sg = 1.0 / s.detach()
    loss = tau_sg * ratio
    if learn_temperature:
        log_u = 0.5 * (log_u_img.detach().float() + log_u_txt.detach().float()).mean()  # the authors' log(u), no eps
        loss = loss + log_u / s + rho / s
    return loss


def rgcl_value(log_g_img: torch.Tensor, log_g_txt: torch.Tensor, logit_scale: torch.Tensor | float,
               rho: float = 0.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The mini-batch RGCL-g value ``tau * mean_i (log(eps+g1_i) + log(eps+g2_i)) / 2 + rho tau`` (detached)."""
    with torch.no_grad():
        s = as_fp32_scale(logit_scale, log_g_img.device)
        return (0.5 * (log_eps_plus(log_g_img, eps) + log_eps_plus(log_g_txt, eps)).mean() + rho) / s

"""AmorLIP's objectives: partition targets, the amortized encoder loss and the lambda losses.

Notation (docs/method.md, "Notation"): x_i, y_j are L2-normalised image/text features, s is the logit
scale, p = ``pos_coef`` weights the matched pair inside every partition sum (w_ii = p, w_ij = 1
otherwise; docs/method.md, "The positive weight pos_coef"), and log lambda / log Lambda are log-partition estimates.

Everything stays in log space and fp32 (docs/method.md, "Numerics"): a partition sum is a logsumexp of the
weighted logits ``s x.y + log w``, the mixture with the previous net is a logaddexp, and every
encoder ratio is ``exp(s x.y + log w - log Lambda)`` -- never an exp followed by a division, which
overflows fp32 once s x.y > 88.7.

Multi-rank (``group`` with W > 1 ranks): a rank's local rows meet all global columns. Partition
targets are global sums (the authors' ``--calculate_full``). In :func:`encoder_loss` each
rank computes its local image rows against all global texts (C_I) and its local text rows against
all global images (C_T); features are gathered with gradient, so gradients return to their owner.
The scaling is: sum over ranks of the per-rank losses = W x the single-process loss on the
concatenated batch, hence DDP/DeepSpeed's 1/W gradient averaging gives the single-process gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from amorlip.objectives.clip import as_fp32_scale
from amorlip.objectives.distributed import gather_no_grad, gather_with_grad, row_offset, world_size

LAMBDA_LOSS_KINDS = ("l2_log", "kl", "js")


def weighted_logits(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    pos_coef: float = 1.0,
    group=None,
    gather: Callable[[torch.Tensor, object], torch.Tensor] = gather_with_grad,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d_ij = s x_i.y_j + log w_ij`` for local rows against all global columns, fp32.

    Returns ``(image_rows [B, G], text_rows [B, G])``: ``image_rows[i, j]`` pairs local image i with
    global text j, ``text_rows[j, i]`` pairs local text j with global image i. ``gather`` decides
    whether the other modality is gathered with or without gradient.
    """
    batch = img.shape[0]
    x, y = img.float(), txt.float()
    s = as_fp32_scale(logit_scale, x.device)
    if world_size(group) == 1:
        image_rows = s * (x @ y.T)
        text_rows = image_rows.T  # one process: the text rows are the columns of the same matrix
    else:
        image_rows = s * (x @ gather(txt, group).float().T)
        text_rows = s * (y @ gather(img, group).float().T)
    if pos_coef != 1.0:
        # the matched pair's weight p enters as log p on its logit (docs/method.md, "Notation")
        rows = torch.arange(batch, device=x.device)
        cols = rows + row_offset(batch, group)
        log_p = torch.tensor(math.log(pos_coef), dtype=torch.float32, device=x.device)
        image_rows = image_rows.index_put((rows, cols), log_p, accumulate=True)
        text_rows = text_rows.index_put((rows, cols), log_p, accumulate=True)
    return image_rows, text_rows


@torch.no_grad()
def partition_targets(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    pos_coef: float = 1.0,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad log partition sums over the global batch (the authors' ``LogTargetCollector``).

    ``log_z_img[i] = log sum_j w_ij exp(s x_i.y_j)`` and ``log_z_txt[j] = log sum_i w_ij exp(s x_i.y_j)``,
    each ``[B]`` for the local rows, fp32. Sums, not means, as the authors' code computes them.
    """
    image_rows, text_rows = weighted_logits(
        img.detach(), txt.detach(), as_fp32_scale(logit_scale, img.device).detach(),
        pos_coef, group, gather=gather_no_grad,
    )
    return torch.logsumexp(image_rows, dim=1), torch.logsumexp(text_rows, dim=1)


@torch.no_grad()
def mix_log_targets(log_target: torch.Tensor, log_prev: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta exp(log_prev) + (1 - beta) exp(log_target))`` in log space (paper Eq. 12).

    The authors mix in linear space; the logaddexp form is the same number without overflow.
    beta = 0 returns the target and beta = 1 the previous net exactly (no log 0).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    log_target = log_target.detach().float()
    log_prev = log_prev.detach().float()
    if beta == 0.0:
        return log_target.clone()
    if beta == 1.0:
        return log_prev.clone()
    return torch.logaddexp(log_prev + math.log(beta), log_target + math.log1p(-beta))


def _amortized_loss(img: torch.Tensor, txt: torch.Tensor, s: torch.Tensor, image_rows: torch.Tensor,
                    text_rows: torch.Tensor, log_lambda_img: torch.Tensor, log_lambda_txt: torch.Tensor) -> torch.Tensor:
    """``-2 s mean_i x_i.y_i + mean_i sum_j exp(d_ij - log Lambda^I_i) + mean_j sum_i exp(d_ij - log Lambda^T_j)``
    from the weighted logits rows of each side; Lambda is detached (a constant for the encoders)."""
    positive = (img.float() * txt.float()).sum(dim=1)
    joint = 2.0 * s * positive.mean()
    cross_image = torch.exp(image_rows - log_lambda_img.detach().float()[:, None]).sum(dim=1).mean()
    cross_text = torch.exp(text_rows - log_lambda_txt.detach().float()[:, None]).sum(dim=1).mean()
    return -joint + cross_image + cross_text


def encoder_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    log_lambda_img: torch.Tensor,
    log_lambda_txt: torch.Tensor,
    pos_coef: float = 1.0,
    group=None,
) -> torch.Tensor:
    """Stage II loss (paper Eq. 6 in the authors' code form; docs/method.md, "Encoder loss"), fp32 scalar.

    ``L = -2 s mean_i x_i.y_i + mean_i sum_j w_ij exp(s x_i.y_j - log Lambda^I_i)
    + mean_j sum_i w_ij exp(s x_i.y_j - log Lambda^T_j)``.

    The log Lambda inputs are treated as constants (detached here: no gradient ever reaches them);
    gradients flow into ``img``, ``txt`` and ``logit_scale``. Multi-rank: per-rank loss as in the
    module docstring (sum over ranks = W x single-process loss on the concatenated batch).
    With ``pos_coef = 1`` and Lambda equal to the in-batch sums, the encoder gradient equals that of
    the *sum* of the two InfoNCE directions, i.e. 2 x the CLIP loss gradient.
    """
    s = as_fp32_scale(logit_scale, img.device)
    image_rows, text_rows = weighted_logits(img, txt, s, pos_coef, group, gather=gather_with_grad)
    return _amortized_loss(img, txt, s, image_rows, text_rows, log_lambda_img, log_lambda_txt)


def encoder_loss_local(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    log_lambda_img: torch.Tensor,
    log_lambda_txt: torch.Tensor,
    pos_coef: float = 1.0,
    global_batch: int | None = None,
) -> torch.Tensor:
    """Stage II loss on the local B x B logits only (``encoder_negatives: local``), fp32 scalar.

    With c = (G - 1) / (B - 1), G = ``global_batch`` (default B) and B the local batch:

    ``L = -2 s mean_i x_i.y_i
    + mean_i [p exp(s x_i.y_i - log Lambda^I_i) + c sum_{j != i} exp(s x_i.y_j - log Lambda^I_i)]
    + mean_j [p exp(s x_j.y_j - log Lambda^T_j) + c sum_{i != j} exp(s x_i.y_j - log Lambda^T_j)]``

    with i, j over the local rows only. If the other ranks' samples are exchangeable with the local
    ones, c times the B - 1 local off-diagonal terms has the expectation of the G - 1 off-diagonal
    terms of the global batch, so each cross term estimates the global-batch sum that Lambda (a
    lambda net's estimate of the global partition sum) normalises. Computed in log space: the
    off-diagonal logits get ``+ log c`` and the diagonal ``+ log p``, and every ratio is
    ``exp(d_ij - log Lambda)``. Nothing is gathered: the function takes no group. On one rank
    (G = B, c = 1) this is :func:`encoder_loss` exactly. Over W ranks the mean of the per-rank
    losses (what the 1/W-averaged encoder gradients optimise) has the joint term of the global batch
    exactly and cross terms that are unbiased estimates of the global ones.
    The log Lambda inputs are detached, as in :func:`encoder_loss`.
    """
    batch = img.shape[0]
    global_batch = batch if global_batch is None else int(global_batch)
    if global_batch < batch:
        raise ValueError(f"global_batch {global_batch} is smaller than the local batch {batch}")
    if global_batch > batch and batch < 2:
        raise ValueError(f"local negatives need a local batch of at least 2 (got {batch}) when G > B")
    s = as_fp32_scale(logit_scale, img.device)
    image_rows, _ = weighted_logits(img, txt, s, pos_coef, group=None)
    if global_batch != batch:
        log_c = math.log(global_batch - 1) - math.log(batch - 1)
        off_diagonal = 1.0 - torch.eye(batch, dtype=image_rows.dtype, device=image_rows.device)
        image_rows = image_rows + log_c * off_diagonal
    text_rows = image_rows.T  # local texts against local images: the columns of the same matrix
    return _amortized_loss(img, txt, s, image_rows, text_rows, log_lambda_img, log_lambda_txt)


def lambda_loss(
    log_lambda: torch.Tensor,
    log_target: torch.Tensor,
    kind: str = "l2_log",
    *,
    pair_logits: torch.Tensor | None = None,
    div_reg_coef: float = 0.1,
) -> torch.Tensor:
    """Stage I loss of one modality's lambda net against the detached (mixed) log target, fp32.

    - ``l2_log`` (paper Eq. 10, code ``log_l2``): ``mean_i (log lambda_i - log Z_i)^2`` (no 1/2).
    - ``kl`` (Eq. 9, code ``kl_div_asym``): ``div_reg_coef * l2_log +
      mean_i [ (c_i / N) exp(-log lambda_i) (log Z_i - log lambda_i) ]`` with
      ``c_i = sum_j exp(d_ij)`` the in-batch sum of this row.
    - ``js`` (code ``js_div``): with ``P_cur = exp(d_ij - log lambda_i)``, ``P_tar = exp(d_ij - log Z_i)``
      and ``M = (P_cur + P_tar) / 2``: ``div_reg_coef * l2_log + (mean(P_cur log(P_cur/M)) +
      mean(P_tar log(P_tar/M))) / 2``, element means over the ``[B, N]`` entries.

    ``pair_logits`` (kl and js only, no grad): ``d_ij = s x_i.y_j + log w_ij`` of this modality's
    local rows against all N global columns (first or second output of :func:`weighted_logits`).
    On one rank N = B and these are the authors' forms exactly (their ``1/|B|^2`` normalisation).
    Because the columns are global, the per-rank losses averaged over ranks (what the all-reduced
    lambda gradients optimise) equal the single-process loss on the concatenated batch, so kl/js are
    valid on any number of ranks (the authors' version used local sums and was single-GPU only).
    Like the authors' forms, kl/js are linear-space ratios and overflow when log lambda is ~88
    below the logits (e.g. a fresh net at large s); l2-log does not.
    """
    if kind not in LAMBDA_LOSS_KINDS:
        raise ValueError(f"unknown lambda loss kind {kind!r}; choose one of {LAMBDA_LOSS_KINDS}")
    log_lambda = log_lambda.float()
    log_target = log_target.detach().float()
    l2_log = (log_lambda - log_target).pow(2).mean()
    if kind == "l2_log":
        return l2_log
    if pair_logits is None:
        raise ValueError(f"lambda loss {kind!r} needs pair_logits (this modality's rows of weighted_logits)")
    d = pair_logits.detach().float()
    if kind == "kl":
        log_mean_row = torch.logsumexp(d, dim=1) - math.log(d.shape[1])
        ratio = torch.exp(log_mean_row - log_lambda)
        divergence = (ratio * (log_target - log_lambda)).mean()
    else:
        log_cur = d - log_lambda[:, None]
        log_tar = d - log_target[:, None]
        log_mid = torch.logaddexp(log_cur, log_tar) - math.log(2.0)
        divergence = 0.5 * ((log_cur.exp() * (log_cur - log_mid)).mean()
                            + (log_tar.exp() * (log_tar - log_mid)).mean())
    return div_reg_coef * l2_log + divergence

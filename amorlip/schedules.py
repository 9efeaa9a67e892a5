"""Pure schedule functions: beta ramp, rho segments, lambda-update cadence, encoder lr.

All are functions of an epoch or step index only, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def beta_for_epoch(epoch: int, beta_max: float, beta_epochs: int) -> float:
    """Mixing weight of the previous-epoch net (paper Eq. 12, code ``get_cosine_ema_beta``).

    ``beta_e = beta_T - beta_T (1 + cos(pi e / T)) / 2`` for e < T, then constant beta_T; evaluated
    per epoch (a step function), with T = ``beta_epochs`` (the authors' ``--beta_decay_epochs``;
    docs/method.md, "Mixing with the previous epoch's net"). beta_0 = 0, so epoch 0 regresses on the in-batch sums alone.
    """
    if epoch >= beta_epochs:
        return float(beta_max)
    return float(beta_max - 0.5 * beta_max * (1.0 + math.cos(math.pi * epoch / beta_epochs)))


def epoch_schedule(values: Sequence[float] | float, total_epochs: int,
                   lengths: Sequence[int] | None = None) -> list[float]:
    """One value per epoch from n values over n epoch segments.

    Without ``lengths`` the segments are equal, as the authors' ``create_epoch_schedule`` makes them:
    ``total_epochs // n`` epochs each, the last value also covering the remainder. So
    ``[8.5, -8.5, -8.5]`` over 33 epochs is +8.5 for epochs 0-10 and -8.5 for 11-32
    (docs/variants.md). ``lengths`` gives each segment's epochs explicitly (summing to
    ``total_epochs``): the paper's "-8.0 for the last quarter" of 30 epochs is ``[6.5, -8.0]`` with
    ``[23, 7]``, which equal segments cannot express (``[6.5, 6.5, 6.5, -8.0]`` gives 9 epochs).
    """
    if isinstance(values, (int, float)):
        return [float(values)] * total_epochs
    values = list(values)
    if not values:
        raise ValueError("an epoch schedule needs at least one value")
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        if len(lengths) != len(values) or sum(lengths) != total_epochs or min(lengths) < 1:
            raise ValueError(f"segment lengths {lengths} must be {len(values)} positive counts summing to "
                             f"{total_epochs}")
        return [float(v) for v, n in zip(values, lengths) for _ in range(n)]
    part = total_epochs // len(values)
    schedule: list[float] = []
    for i, value in enumerate(values):
        count = total_epochs - part * i if i == len(values) - 1 else part
        schedule.extend([float(value)] * count)
    return schedule


def rho_for_epoch(epoch: int, rho: Sequence[float], total_epochs: int,
                  lengths: Sequence[int] | None = None) -> float:
    """rho of ``loss / sg(s) + rho / s`` in ``epoch`` (paper App. C); past the last epoch, the last value."""
    schedule = epoch_schedule(rho, max(total_epochs, 1), lengths)
    return schedule[min(epoch, len(schedule) - 1)]


def is_lambda_step(step_in_epoch: int, t_online: int) -> bool:
    """Stage I runs on in-epoch steps k with k % T_online == 0 (the counter restarts every epoch)."""
    return step_in_epoch % t_online == 0


def is_ema_step(step_in_epoch: int, t_target: int) -> bool:
    """The EMA target net is updated on in-epoch steps k with k % T_target == 0 (paper Eq. 11)."""
    return step_in_epoch % t_target == 0


def is_reinit_epoch(epoch: int, every_epochs: int) -> bool:
    """The online lambda nets are re-initialised at epochs e with e % every == 0 (Alg. 1 line 4)."""
    return epoch % every_epochs == 0


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Encoder lr at global ``step``: linear warmup to ``base_lr``, then cosine to 0 at ``total``.

    open_clip's ``cosine_lr`` (the authors' default ``--lr-scheduler``): ``base_lr (step + 1) / warmup``
    during warmup, ``base_lr (1 + cos(pi e / (total - warmup))) / 2`` with ``e = step - warmup`` after;
    0 from ``total`` on.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = total - warmup
    if decay_steps <= 0 or step >= total:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay_steps)) * base_lr

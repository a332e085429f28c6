"""Step-indexed schedules: distillation weight, learning rate, weight decay and dropout.

Codistillation (Anil et al. 2018, arXiv 1804.03235) needs a burn-in: freshly initialized peers
predict noise, and distilling toward noise only slows every replica, so alpha stays 0 until the
replicas have learned something and then ramps up instead of switching on abruptly. Sodhani et
al. (arXiv 2010.02838) observe that codistillation regularizes by itself and therefore lower
weight decay (1e-4 -> 1e-5 -> 0) at the learning-rate decays; `piecewise_constant` expresses
that and the matching dropout schedule.

All functions are pure functions of the step, so a resumed run reproduces the same values
without saving scheduler state. The distillation hyperparameters alpha and temperature
(Hinton et al. 2015) are scheduled here; their T^2 scaling lives in `losses.py`.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

LR_SCHEDULES = ("constant", "cosine", "linear")


def _check_non_negative(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def alpha_at(step: int, alpha: float, burn_in: int, ramp: int) -> float:
    """Distillation weight at `step`: 0 during burn-in, then a linear ramp up to `alpha`.

    The ramp is alpha * min(1, (step - burn_in + 1) / ramp), so the first step after burn-in
    already distills (weight alpha / ramp) and full weight is reached after exactly `ramp`
    distilling steps, at step burn_in + ramp - 1. ramp == 0 switches alpha on at burn_in."""
    _check_non_negative(burn_in=burn_in, ramp=ramp)
    if step < burn_in:
        return 0.0
    if ramp == 0:
        return float(alpha)
    return float(alpha) * min(1.0, (step - burn_in + 1) / ramp)


def piecewise_constant(step: int, initial: float, milestones: Sequence[tuple[int, float]]) -> float:
    """Value of the last milestone whose step is <= `step`, else `initial`.

    Milestones must be strictly increasing in step: an unsorted or duplicated list is almost
    always a config mistake, and silently picking one reading of it would hide that."""
    steps = [int(m_step) for m_step, _ in milestones]
    for prev, cur in itertools.pairwise(steps):
        if cur <= prev:
            raise ValueError(f"milestones must be sorted by strictly increasing step, got {steps}")
    pos = bisect.bisect_right(steps, step)
    return float(initial) if pos == 0 else float(milestones[pos - 1][1])


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str,
          min_lr: float = 0.0) -> float:
    """Learning rate at `step`: linear warmup, then constant, cosine or linear decay.

    Warmup gives (step + 1) / warmup * base_lr, so step 0 already trains and step warmup - 1
    reaches base_lr. The decays run from base_lr at step `warmup` to min_lr at step `total`
    and stay at min_lr afterwards, so a run extended past `total` does not diverge."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    _check_non_negative(step=step, warmup=warmup, total=total)
    if schedule != "constant" and total < warmup:
        raise ValueError(f"total ({total}) must be >= warmup ({warmup}) for a {schedule} decay")
    if step < warmup:
        return (step + 1) / warmup * float(base_lr)
    if schedule == "constant":
        return float(base_lr)
    if step >= total:
        return float(min_lr)
    progress = (step - warmup) / (total - warmup)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return float(min_lr) + (float(base_lr) - float(min_lr)) * shape

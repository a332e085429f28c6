"""The numbers of the critical-batch measurement, as pure functions (no torch, no training).

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162):

- Steps S and examples E = B x S needed to reach a fixed loss trade off as

      (S / S_min - 1) (E / E_min - 1) = 1,

  which is the same as S(B) = S_min (1 + B_crit / B) and E(B) = E_min (1 + B / B_crit) with
  B_crit = E_min / S_min: linear in 1/B, S = S_min + E_min / B. `fit_critical_batch` fits that
  line to a measured ladder (least squares on relative errors).
- The simple gradient noise scale B_simple = tr(Sigma) / |G|^2, measured with the two-batch-size
  estimator of their appendix A.1: with |G_B|^2 the squared norm of a gradient averaged over B
  examples, E|G_B|^2 = |G|^2 + tr(Sigma) / B, so from a small and a big batch

      |G|^2  ~  (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
      S      ~  (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

  are unbiased; each is averaged over many steps before their ratio is taken (the ratio of
  noisy estimates is biased). Here B counts sequences: Sigma is the covariance of one
  sequence's gradient (its tokens are not independent), so B_simple comes out in sequences.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def crossing(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """First step at which a (step, loss) curve reaches `target`, interpolated linearly in
    (log step, loss) between the last evaluation above it and the first at or below it; None
    if the curve never gets there. Evaluations are on a geometric grid of steps, so the
    interpolation is in log step."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[0] <= 0:
                return float(step)
            (s0, l0), (s1, l1) = prev, (step, loss)
            frac = (l0 - target) / (l0 - l1)
            return math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0)))
        prev = (step, loss)
    return None


def two_batch_terms(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """One step's unbiased estimates (|G|^2, tr(Sigma)) from the squared gradient norms at two
    batch sizes (McCandlish et al. A.1)."""
    if not b_big > b_small > 0:
        raise ValueError(f"need b_big > b_small > 0, got {b_small}, {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def noise_scale(g2_sum: float, trace_sum: float) -> float:
    """B_simple from sums (or means) of the per-step estimates over the same steps; inf when the
    estimated |G|^2 is not positive (the true gradient lost in the noise)."""
    return trace_sum / g2_sum if g2_sum > 0 else math.inf


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float]) -> dict:
    """Fit S(B) = S_min + E_min / B to the ladder (weights 1/S_i: least squares on relative
    errors, so a ladder spanning 100x in steps is not fitted to its smallest batches only).

    Returns S_min (steps), E_min (examples, in the unit of `batches`), B_crit = E_min / S_min,
    and the largest relative residual. Exact for data on the curve."""
    if len(batches) != len(steps) or len(batches) < 2:
        raise ValueError("need at least two (batch, steps) points")
    # minimise sum_i ((a + b x_i - S_i) / S_i)^2 with x_i = 1 / B_i: weighted normal equations.
    rows = [(1.0 / s, (1.0 / bt) / s, 1.0) for bt, s in zip(batches, steps)]  # (w, w x, target w S = 1)
    saa = sum(r[0] * r[0] for r in rows)
    sab = sum(r[0] * r[1] for r in rows)
    sbb = sum(r[1] * r[1] for r in rows)
    say = sum(r[0] * r[2] for r in rows)
    sby = sum(r[1] * r[2] for r in rows)
    det = saa * sbb - sab * sab
    if abs(det) < 1e-300:
        raise ValueError("degenerate ladder (all batches equal?)")
    s_min = (say * sbb - sab * sby) / det
    e_min = (saa * sby - sab * say) / det
    fitted = [s_min + e_min / bt for bt in batches]
    resid = max(abs(f - s) / s for f, s in zip(fitted, steps))
    b_crit = e_min / s_min if s_min > 0 else math.inf
    return {"S_min": s_min, "E_min": e_min, "B_crit": b_crit, "max_rel_residual": resid}


def doubling_ratios(batches: Sequence[float], steps: Sequence[float]) -> list[dict]:
    """S(B) / S(2B) for neighbouring rungs of a ladder of doublings: 2 is perfect scaling,
    1 is none; the McCandlish curve gives 4/3 at B = B_crit."""
    pts = sorted(zip(batches, steps))
    out = []
    for (b0, s0), (b1, s1) in itertools.pairwise(pts):
        out.append({"batch": b0, "next": b1, "ratio": s0 / s1, "ideal": b1 / b0})
    return out

"""Tests for codistill_ds.schedules: hand-computed values at every boundary."""

from __future__ import annotations

import math

import pytest

from codistill_ds.schedules import alpha_at, lr_at, piecewise_constant


def test_alpha_burn_in_then_linear_ramp() -> None:
    # burn_in=10, ramp=4: steps 10..13 give 1/4, 2/4, 3/4, 4/4 of alpha.
    assert alpha_at(0, 0.8, 10, 4) == 0.0
    assert alpha_at(9, 0.8, 10, 4) == 0.0
    assert alpha_at(10, 0.8, 10, 4) == pytest.approx(0.2)
    assert alpha_at(11, 0.8, 10, 4) == pytest.approx(0.4)
    assert alpha_at(12, 0.8, 10, 4) == pytest.approx(0.6)
    assert alpha_at(13, 0.8, 10, 4) == pytest.approx(0.8)
    assert alpha_at(10_000, 0.8, 10, 4) == pytest.approx(0.8)


def test_alpha_without_ramp_or_burn_in() -> None:
    assert alpha_at(4, 0.5, 5, 0) == 0.0
    assert alpha_at(5, 0.5, 5, 0) == 0.5
    assert alpha_at(0, 0.5, 0, 0) == 0.5
    assert alpha_at(0, 1.0, 0, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ramp"):
        alpha_at(0, 1.0, 0, -1)
    with pytest.raises(ValueError, match="burn_in"):
        alpha_at(0, 1.0, -3, 1)


def test_piecewise_constant_weight_decay_schedule() -> None:
    # Sodhani et al.: 1e-4 -> 1e-5 at the first LR decay -> 0 at the second.
    milestones = [(100, 1e-5), (200, 0.0)]
    assert piecewise_constant(0, 1e-4, milestones) == 1e-4
    assert piecewise_constant(99, 1e-4, milestones) == 1e-4
    assert piecewise_constant(100, 1e-4, milestones) == 1e-5
    assert piecewise_constant(199, 1e-4, milestones) == 1e-5
    assert piecewise_constant(200, 1e-4, milestones) == 0.0
    assert piecewise_constant(10**9, 1e-4, milestones) == 0.0
    assert piecewise_constant(5, 0.1, []) == 0.1
    assert piecewise_constant(0, 0.1, [(0, 0.0)]) == 0.0


def test_piecewise_constant_rejects_unsorted_milestones() -> None:
    with pytest.raises(ValueError, match="sorted"):
        piecewise_constant(0, 1.0, [(200, 0.0), (100, 0.5)])
    with pytest.raises(ValueError, match="sorted"):
        piecewise_constant(0, 1.0, [(100, 0.0), (100, 0.5)])


def test_lr_warmup() -> None:
    # warmup=4: (step + 1) / 4 * base_lr, so step 3 reaches base_lr.
    for schedule in ("constant", "cosine", "linear"):
        assert lr_at(0, 1.0, 4, 20, schedule) == 0.25
        assert lr_at(1, 1.0, 4, 20, schedule) == 0.5
        assert lr_at(3, 1.0, 4, 20, schedule) == 1.0
        assert lr_at(4, 1.0, 4, 20, schedule) == 1.0  # decay starts from base_lr


def test_lr_constant() -> None:
    assert lr_at(0, 3e-4, 0, 100, "constant") == 3e-4
    assert lr_at(500, 3e-4, 10, 100, "constant") == 3e-4


def test_lr_cosine() -> None:
    # warmup 10, total 110: progress = (step - 10) / 100.
    assert lr_at(10, 1.0, 10, 110, "cosine") == 1.0
    assert lr_at(60, 1.0, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_at(35, 1.0, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, 1.0, 10, 110, "cosine", min_lr=0.2) == pytest.approx(0.6)
    assert lr_at(110, 1.0, 10, 110, "cosine", min_lr=0.2) == 0.2
    assert lr_at(500, 1.0, 10, 110, "cosine", min_lr=0.2) == 0.2
    assert lr_at(109, 1.0, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))


def test_lr_linear() -> None:
    assert lr_at(0, 2.0, 0, 100, "linear") == 2.0
    assert lr_at(25, 2.0, 0, 100, "linear") == pytest.approx(1.5)
    assert lr_at(50, 2.0, 0, 100, "linear", min_lr=1.0) == pytest.approx(1.5)
    assert lr_at(99, 2.0, 0, 100, "linear") == pytest.approx(0.02)
    assert lr_at(100, 2.0, 0, 100, "linear") == 0.0
    assert lr_at(150, 2.0, 0, 100, "linear", min_lr=0.1) == 0.1


def test_lr_errors() -> None:
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        lr_at(0, 1.0, 0, 10, "step")
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, 1.0, 20, 10, "cosine")
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1.0, 0, 10, "constant")

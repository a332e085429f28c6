"""What the critical-batch ladder runs: modes (sizes), the learning-rate search, one run's settings.

A *run* is synchronous training of one model at global batch G (sequences of seq_len tokens)
and one learning rate, in one process: mathematically the data-parallel job at global batch G
(TrainStream gives a 1-rank group the same windows, in the same order, as the G sequences a
data-parallel group of any size splits among its ranks), on one core. It reads the corpus once
at most (no window twice), evaluates on a geometric grid of steps, and stops when it reaches
the lowest target validation loss, when it has taken more steps than the best learning rate
of its batch needed (it cannot be the best one), or at the end of the one pass.

Learning rate per batch: a grid lr_j = lr_base x 2^(j/2); the search at batch G starts at
j_c(G) = j_ref + round(log2(G / g_ref)) (square-root scaling, a guess only), runs j_c - 2 and
j_c + 2, extends past an edge while the best is at it, then refines to sqrt(2) around the
best (`next_lr`). Schedule: linear warmup, then constant (steps to target on a schedule that
does not depend on knowing the end).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from benchmarks.quality.settings import MODES as QUALITY_MODES
from benchmarks.quality.settings import ModelSize

BASE_SEED = 1234


@dataclass(frozen=True)
class Mode:
    name: str
    model: ModelSize
    seq_len: int
    max_bytes: int | None
    """Corpus cap (None: the whole built-in standard-library corpus)."""
    val_fraction: float
    val_windows: int
    """Validation windows scored at every evaluation, spread evenly over the held-out split."""
    batches: tuple[int, ...]
    """The ladder: global batches in sequences."""
    targets: tuple[float, ...]
    """Target validation losses (nats/byte); the lowest decides when a run stops."""
    lr_base: float = 1e-3
    j_ref: int = 3
    """lr_base x 2^(j_ref/2) at g_ref sequences: the search's first guess."""
    g_ref: int = 32
    max_lrs: int = 6
    """Learning rates tried per batch at most."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eval_ratio: float = 2 ** 0.125
    """Evaluations at the steps round(eval_ratio^k) >= eval_min (9% apart), and at the end."""
    eval_min: int = 8
    noise_band: float = 0.1
    """B_simple at target T pools the noise records whose interval ends with val loss in
    [T, T + noise_band]."""


SMOKE = Mode("smoke", ModelSize(32, 2, 64), seq_len=32, max_bytes=300_000, val_fraction=0.05,
             val_windows=32, batches=(2, 4, 8), targets=(3.3, 3.0), lr_base=4e-3, j_ref=2, g_ref=4,
             max_lrs=3, warmup_steps=5, eval_min=4)
QUICK = Mode("quick", QUALITY_MODES["quick"].model, seq_len=128, max_bytes=None, val_fraction=0.02,
             val_windows=256, batches=(4, 8, 16, 32, 64, 128, 256), targets=(2.0, 1.8, 1.7, 1.6))
FULL = Mode("full", QUALITY_MODES["full"].model, seq_len=128, max_bytes=None, val_fraction=0.02,
            val_windows=256, batches=(4, 8, 16, 32, 64, 128, 256), targets=(2.0, 1.8, 1.7, 1.6))
MODES = {m.name: m for m in (SMOKE, QUICK, FULL)}


def lr_of(mode: Mode, j: int) -> float:
    return float(f"{mode.lr_base * 2 ** (j / 2):.4g}")


def center_j(mode: Mode, batch: int) -> int:
    return mode.j_ref + round(math.log2(batch / mode.g_ref))


def next_lr(mode: Mode, batch: int, tried: dict[int, float | None]) -> int | None:
    """The next grid index to try at `batch` given {j: steps to the lowest target (None: not
    reached)}; None when the search is over. The best is the fewest steps."""
    c = center_j(mode, batch)
    for j in (c, c - 2, c + 2):
        if j not in tried:
            return j if len(tried) < mode.max_lrs else None
    reached = {j: s for j, s in tried.items() if s is not None}
    if not reached:
        return None  # no learning rate reaches the target at this batch: reported as such
    best = min(reached, key=lambda j: (reached[j], j))
    lo, hi = min(tried), max(tried)
    for j in ((best - 2,) if best == lo else ()) + ((best + 2,) if best == hi else ()) + (best - 1, best + 1):
        if j not in tried and len(tried) < mode.max_lrs:
            return j
    return None


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies a run; `limit` (stop once past this many steps without the
    lowest target) is how it ends, not what it trains."""

    mode: str
    model: dict
    seq_len: int
    max_bytes: int | None
    val_fraction: float
    val_windows: int
    batch: int
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    betas: tuple[float, float]
    seed: int
    targets: tuple[float, ...]
    eval_ratio: float
    eval_min: int
    schedule: str = "constant"
    corpus: str = "stdlib"
    limit: int | None = field(default=None, compare=False)

    def key(self) -> dict:
        d = asdict(self)
        d.pop("limit")
        d["betas"], d["targets"] = list(self.betas), list(self.targets)
        return d

    def name(self) -> str:
        return f"G{self.batch:04d}-lr{self.lr:.4g}-s{self.seed}"


def spec_of(mode: Mode, batch: int, lr: float, seed: int, targets: tuple[float, ...] | None = None,
            limit: int | None = None) -> RunSpec:
    return RunSpec(mode.name, asdict(mode.model), mode.seq_len, mode.max_bytes, mode.val_fraction,
                   mode.val_windows, batch, lr, mode.warmup_steps, mode.weight_decay, mode.grad_clip,
                   mode.betas, seed, tuple(sorted(mode.targets if targets is None else targets, reverse=True)),
                   mode.eval_ratio, mode.eval_min, limit=limit)


def eval_steps(mode_ratio: float, first: int, last: int) -> list[int]:
    """round(ratio^k) for k >= 0 within [first, last], and last itself."""
    out, k = set(), 0
    while True:
        s = round(mode_ratio ** k)
        if s > last:
            break
        if s >= first:
            out.add(s)
        k += 1
    out.add(last)
    return sorted(out)

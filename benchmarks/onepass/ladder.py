"""Which runs the ladder needs, in which order, reusing every finished one.

Phase 1 trains the first-guess learning rate at every batch (a coarse ladder early); phase 2
searches each batch's learning rate (settings.next_lr), every new run stopped once it has
taken more steps than the batch's best so far without reaching the lowest target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from . import trainer
from .settings import Mode, RunSpec, center_j, lr_of, next_lr, spec_of


def primary_steps(rec: dict) -> float | None:
    """Steps to the lowest target (None: not reached)."""
    low = f"{min(rec['spec']['targets']):g}"
    got = rec["crossings"].get(low)
    return got["steps"] if got else None


class Ladder:
    def __init__(self, mode: Mode, out: Path, seed: int, batches: list[int], log=print,
                 on_run: Callable[[], None] | None = None) -> None:
        self.mode, self.out, self.seed, self.batches, self.log = mode, out, seed, batches, log
        self.on_run = on_run or (lambda: None)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        self.tried: dict[int, dict[int, dict]] = {b: {} for b in batches}
        """batch -> grid index j -> run record."""

    def path(self, spec: RunSpec) -> Path:
        return self.out / "runs" / f"{spec.name()}.json"

    def best(self, batch: int) -> float | None:
        steps = [s for s in (primary_steps(r) for r in self.tried[batch].values()) if s is not None]
        return min(steps) if steps else None

    def run(self, batch: int, j: int) -> dict:
        best = self.best(batch)
        spec = spec_of(self.mode, batch, lr_of(self.mode, j), self.seed,
                       limit=None if best is None else math.ceil(best))
        rec = trainer.load(self.path(spec), spec)
        if rec is None:
            self.log(f"onepass: training G={batch} lr={spec.lr:g} (limit {spec.limit})")
            rec = trainer.train(spec, self.path(spec), self.log)
        self.tried[batch][j] = rec
        self.on_run()
        return rec

    def steps_of(self, batch: int) -> dict[int, float | None]:
        return {j: primary_steps(r) for j, r in self.tried[batch].items()}

    def search(self) -> None:
        for b in self.batches:  # phase 1: the first guess everywhere
            self.run(b, center_j(self.mode, b))
        for b in self.batches:  # phase 2: each batch's learning rate
            while (j := next_lr(self.mode, b, self.steps_of(b))) is not None:
                self.run(b, j)

    def records(self) -> list[dict]:
        return [r for b in self.batches for r in self.tried[b].values()]


def probe(mode: Mode, out: Path, seed: int, batches: list[int], log=print) -> list[dict]:
    """The first-guess learning rate at each batch, no target: one whole pass (timing and the
    loss reachable, to choose the targets)."""
    (out / "probe").mkdir(parents=True, exist_ok=True)
    recs = []
    for b in batches:
        spec = spec_of(mode, b, lr_of(mode, center_j(mode, b)), seed, targets=())
        path = out / "probe" / f"{spec.name()}.json"
        rec = trainer.load(path, spec)
        if rec is None:
            log(f"onepass: probe G={b} lr={spec.lr:g}, one pass")
            rec = trainer.train(spec, path, log)
        recs.append(rec)
    return recs

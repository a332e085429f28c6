"""Which runs the ladder needs, in which order, reusing every finished one.

Phase 1 trains the first-guess learning rate at every batch (a coarse ladder early), phase 2
a factor 2 either side at every batch, phase 3 the rest of each batch's search
(settings.next_lr: edges, then sqrt(2) refinements); every run after a batch's first is
stopped once it has taken more steps than the batch's best so far without reaching the
lowest target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from . import trainer
from .estimate import crossing
from .settings import Mode, RunSpec, center_j, lr_of, next_lr, spec_of


def primary_steps(rec: dict, target: float | None = None) -> float | None:
    """Steps to `target` (default: the lowest; None: not reached)."""
    low = f"{min(rec['spec']['targets']) if target is None else target:g}"
    got = rec["crossings"].get(low)
    return got["steps"] if got else None


def from_probe(probe_path: Path, spec: RunSpec) -> dict | None:
    """A finished probe run (one whole pass, no target) of the same settings as `spec` but its
    targets, read as a ladder run: its crossings recomputed for spec's targets from its curve.
    It trained past the lowest target: its record keeps every step it ran."""
    if not probe_path.exists():
        return None
    rec = json.loads(probe_path.read_text())
    want = {**spec.key(), "targets": []}
    if not rec.get("done") or rec["spec"] != json.loads(json.dumps(want)):
        return None
    curve = [(e["step"], e["val_loss"]) for e in rec["evals"]]
    crossings = {}
    for t in spec.targets:
        s = crossing(curve, t)
        if s is not None:
            crossings[f"{t:g}"] = {"steps": s, "tokens": s * spec.batch * spec.seq_len}
    stop = "target" if all(f"{t:g}" in crossings for t in spec.targets) else rec["stop"]
    return {**rec, "spec": spec.key(), "crossings": crossings, "stop": stop, "limit": spec.limit,
            "from_probe": str(probe_path.name)}


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
        if rec is None and (rec := from_probe(self.out / "probe" / self.path(spec).name, spec)) is not None:
            self.path(spec).write_text(json.dumps(rec, indent=1) + "\n")
            self.log(f"onepass: G={batch} lr={spec.lr:g} read from its probe run")
        if rec is None:
            self.log(f"onepass: training G={batch} lr={spec.lr:g} (limit {spec.limit})")
            rec = trainer.train(spec, self.path(spec), self.log)
        self.tried[batch][j] = rec
        self.on_run()
        return rec

    def steps_of(self, batch: int) -> dict[int, float | None]:
        """Steps of each tried learning rate to the lowest target any of them reached (the
        lowest overall when one did): a batch too large to reach the lowest target within
        one pass still gets its learning rate searched, on the next target up."""
        runs = self.tried[batch]
        for t in sorted(self.mode.targets):
            steps = {j: primary_steps(r, t) for j, r in runs.items()}
            if any(s is not None for s in steps.values()):
                return steps
        return {j: None for j in runs}

    def search(self) -> None:
        """First guesses everywhere, then a factor 2 either side everywhere (a ladder tuned on a
        factor-2 grid early), then each batch's edges and sqrt(2) refinements."""
        for b in self.batches:
            self.run(b, center_j(self.mode, b))
        for b in self.batches:
            c = center_j(self.mode, b)
            for j in (c - 2, c + 2):
                if next_lr(self.mode, b, self.steps_of(b)) == j:
                    self.run(b, j)
        for b in self.batches:
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

"""The one-pass regimes' own table and goals (issue 23): equal updates, equal tokens, the FLOPs axis.

Every arm of a one-pass regime trains the same number of updates (sync-half: with half the
tokens). At the end of the pass the constant-rate runs are still improving, so the comparison
is the final validation loss (the mean of the models and seeds; seed by seed against sync at
2B, which shares seed s's data order and initialization). On the compute axis each arm's curve
is placed at (update x its bill per update): counted FLOPs, and measured CPU seconds
(bill.py). "At sync's budget" is the arm's validation loss, interpolated on its own curve, at
the compute sync spent on its whole pass; "to sync's loss" is the compute the arm needed to reach
sync's final validation loss, as a multiple of sync's.

Goal (issue 23): at a per-group batch at or past the critical batch, codistill K=2 reaches a
validation loss at or below sync at 2B at equal updates, and within 1% of it on the FLOPs axis
(its loss at sync's FLOPs at most 1.01 x sync's final loss).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict


def interpolate(curve: list[list[float]], x: float) -> float | None:
    """y at x on a piecewise-linear curve [[x, y], ...] (None outside it)."""
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1] if curve and math.isclose(x, curve[-1][0]) else None


def first_below(curve: list[list[float]], y: float) -> float | None:
    """The first x where the curve reaches y (linear between evaluations), None if never."""
    prev = None
    for x1, y1 in curve:
        if y1 <= y:
            if prev is None:
                return x1
            x0, y0 = prev
            return x0 + (x1 - x0) * (y0 - y) / (y0 - y1)
        prev = (x1, y1)
    return None


def seed_curves(arm: dict) -> dict[int, list[list[float]]]:
    """Each seed's mean validation curve over its models (step, loss)."""
    by_seed: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in arm["per_group"]:
        for step, v in m["val_history"]:
            by_seed[m["seed"]][step].append(v)
    return {s: [[st, statistics.fmean(v)] for st, v in sorted(c.items())] for s, c in sorted(by_seed.items())}


def _scaled(curve: list[list[float]], per_update: float) -> list[list[float]]:
    return [[0.0, math.inf]] + [[s * per_update, v] for s, v in curve] if curve and curve[0][0] > 0 else \
        [[s * per_update, v] for s, v in curve]


def compute_axis(arm: dict, ref: dict, unit: str) -> dict:
    """The arm against `ref` (sync at 2B) on a compute axis: unit "flops" (counted) or "cpu"
    (measured CPU seconds). Per seed and for the mean curves."""
    key = "flops_per_update" if unit == "flops" else "cpu_s_per_update"
    a, r = arm["bill"].get(key), ref["bill"].get(key)
    if not a or not r:
        return {}
    out: dict = {"per_update_vs_sync": a / r}
    ref_seeds, seeds = seed_curves(ref), seed_curves(arm)
    pairs = [(s, seeds[s], ref_seeds[s]) for s in seeds if s in ref_seeds]
    pairs.append(("mean", arm["val_curve"], ref["val_curve"]))
    for seed, mine, theirs in pairs:
        budget = theirs[-1][0] * r
        target = theirs[-1][1]
        at = interpolate(_scaled(mine, a), budget)
        reach = first_below(_scaled(mine, a), target)
        out[str(seed)] = {"loss_at_sync_budget": at, "gap_at_sync_budget_pct": None if at is None else (at / target - 1) * 100,
                          "compute_to_sync_loss_vs_sync": None if reach is None else reach / budget}
    return out


def summarize(results: dict) -> dict:
    """Per arm: final val per seed and its gap to sync at 2B, the bill, the compute axes."""
    arms = results["arms"]
    ref = arms.get("sync")
    out = {}
    for name, arm in arms.items():
        if "bill" not in arm:
            continue
        finals = {s: c[-1][1] for s, c in seed_curves(arm).items()}
        entry = {"final_by_seed": finals, "updates": arm["val_curve"][-1][0]}
        if ref is not None:
            ref_finals = {s: c[-1][1] for s, c in seed_curves(ref).items()}
            entry["final_gap_vs_sync_by_seed_pct"] = {s: (v / ref_finals[s] - 1) * 100 for s, v in finals.items()
                                                      if s in ref_finals}
            entry["final_gap_vs_sync_pct"] = (arm["final_val_loss"] / ref["final_val_loss"] - 1) * 100
            entry["flops"] = compute_axis(arm, ref, "flops")
            entry["cpu"] = compute_axis(arm, ref, "cpu")
        out[name] = entry
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(results: dict) -> str:
    arms, summary = results["arms"], results.get("onepass", {})
    cols = ["arm", "seeds", "updates", "final val loss (mean)", "sd over seeds", "vs sync 2B", "vs sync 2B, seed by seed",
            "final per model", "tokens/update", "GFLOPs/update (counted)", "x sync", "CPU s/update (measured)", "x sync",
            "val at sync's FLOPs", "FLOPs to sync's loss (x sync)", "val at sync's CPU s", "CPU to sync's loss (x sync)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, s in summary.items():
        a, b = arms[name], arms[name]["bill"]
        fl, cpu = s.get("flops", {}), s.get("cpu", {})
        by_seed = ", ".join(_pct(v) for v in s.get("final_gap_vs_sync_by_seed_pct", {}).values()) or "-"
        cells = [name, str(a["seeds"]), str(s["updates"]), f"{a['final_val_loss']:.4f}",
                 _x(a["final_val_loss_seed_sd"]), _pct(s.get("final_gap_vs_sync_pct")), by_seed,
                 ", ".join(f"{m['final_val_loss']:.4f}" for m in a["per_group"]),
                 f"{b['tokens_per_update']:,}", f"{b['flops_per_update'] / 1e9:.2f}", _x(fl.get("per_update_vs_sync")),
                 _x(b.get("cpu_s_per_update")), _x(cpu.get("per_update_vs_sync")),
                 _pct(fl.get("mean", {}).get("gap_at_sync_budget_pct")),
                 _x(fl.get("mean", {}).get("compute_to_sync_loss_vs_sync")),
                 _pct(cpu.get("mean", {}).get("gap_at_sync_budget_pct")),
                 _x(cpu.get("mean", {}).get("compute_to_sync_loss_vs_sync"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """The issue's goal for this batch, met or not, seed by seed."""
    s = results.get("onepass", {})
    if "codistill" not in s or "sync" not in s:
        return []
    c = s["codistill"]
    seeds = c.get("final_gap_vs_sync_by_seed_pct", {})
    flops = c.get("flops", {})
    at_fl = {k: v["gap_at_sync_budget_pct"] for k, v in flops.items() if isinstance(v, dict)}
    eq = all(v <= 0 for v in seeds.values()) and c["final_gap_vs_sync_pct"] <= 0
    fl = all(v is not None and v <= 1.0 for v in at_fl.values()) and bool(at_fl)
    by_seed = ", ".join(_pct(v) for v in seeds.values())
    at = ", ".join(f"{k}: {_pct(v)}" for k, v in at_fl.items())
    per = flops.get("per_update_vs_sync", 0)
    return [
        (f"codistill K=2 at or below sync at 2B at equal updates: {'met' if eq else 'missed'} (mean "
         f"{_pct(c['final_gap_vs_sync_pct'])}; seed by seed {by_seed})"),
        (f"codistill within 1% of sync at 2B on the FLOPs axis (val at sync's FLOPs): {'met' if fl else 'missed'} "
         f"({at}; per update x{per:.3f} sync's FLOPs)"),
    ]

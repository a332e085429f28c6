"""Part (b) of the communication benchmark: a group's step time with codistillation against the
same group training alone, exchange-batch compute excluded, arms alternated and reported per
repeat. Everything comes from the run's own metrics.jsonl (one record per step): `step_ms`,
`exchange_compute_ms` (the teacher forward and compression of the step's exchange, which the
engine times) and `exchange_ms` (what the step waited for the swap); nothing of the library is
patched. Main-thread CPU times come from the worker's wrap of the public `train_step`."""

from __future__ import annotations

from pathlib import Path

from .common import (
    ALONE_INTERVAL,
    Mode,
    base_sets,
    fmt,
    load_run,
    mean,
    median,
    sets_of,
)


def overhead_arms(mode: Mode, runs: Path) -> list[dict]:
    common = {"train.steps": mode.overhead_steps, "codistill.alpha": 0.0,
              "data.exchange_batch_size": mode.exchange_batch}
    kinds = {
        "alone": {"codistill.interval": ALONE_INTERVAL},
        "exchange-sync": {"codistill.staleness": 0},
        "exchange-async": {"codistill.staleness": mode.staleness, "codistill.async_exchange": True},
        "exchange-async-stale8": {"codistill.staleness": 8, "codistill.async_exchange": True},
        "exchange-async-alpha1": {"codistill.staleness": mode.staleness,
                                  "codistill.async_exchange": True, "codistill.alpha": 1.0},
        "exchange-async-interleaved": {"codistill.staleness": mode.staleness,
                                       "codistill.async_exchange": True,
                                       "codistill.interval": 2 * mode.staleness},
    }
    arms = []
    names = list(kinds)
    for rep in range(mode.overhead_repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no fixed position
        for kind in order:
            extra = kinds[kind]
            sets = base_sets(mode, **{**common, **extra})
            arms.append({"name": f"{kind}-r{rep}", "kind": kind, "repeat": rep,
                         "overrides": sets_of(sets),
                         "run_dir": str(runs / "overhead" / f"{kind}-r{rep}")})
    return arms


def _probe_steps(run: dict, groups: list[int], skip: int) -> list[dict]:
    """Per-step timings of each group's leader from metrics.jsonl (log_interval 1), joined with
    the worker's CPU times of the same step (rank = group: one rank per group)."""
    cpu = {(r, p["step"]): p for r in groups for p in run["comm"][r]["probe"]}
    out = []
    for rec in run["records"]:
        step, g = rec["step"] - 1, rec["group"]
        if g not in groups or step < skip or "step_ms" not in rec:
            continue
        compute = rec.get("exchange_compute_ms") or 0.0
        extra = cpu.get((g, step), {})
        out.append({"step": step, "rank": g, "step_ms": rec["step_ms"], "exchange_ms": rec["exchange_ms"] or 0.0,
                    "exchange_compute_ms": compute, "excl_ms": rec["step_ms"] - compute,
                    "cpu_ms": extra.get("cpu_ms", 0.0), "main_cpu_ms": extra.get("main_cpu_ms", 0.0),
                    "excl_cpu_ms": extra.get("cpu_ms", 0.0) - compute})
    return out


def _arm_timing(steps: list[dict]) -> dict:
    col = lambda k: [s[k] for s in steps]
    return {
        "n": len(steps),
        "step_ms_median": median(col("step_ms")), "step_ms_mean": mean(col("step_ms")),
        "excl_ms_median": median(col("excl_ms")), "excl_ms_mean": mean(col("excl_ms")),
        "exchange_compute_ms_median": median(col("exchange_compute_ms")),
        "exchange_ms_median": median(col("exchange_ms")), "exchange_ms_mean": mean(col("exchange_ms")),
        "cpu_ms_median": median(col("cpu_ms")), "excl_cpu_ms_median": median(col("excl_cpu_ms")),
    }


def overhead_table(arms: list[dict], runs: dict, leaders: list[int], skip: int) -> dict:
    by_kind: dict[str, dict] = {}
    for arm in arms:
        steps = _probe_steps(runs[arm["name"]], leaders, skip)
        entry = by_kind.setdefault(arm["kind"], {"repeats": [], "steps": []})
        entry["repeats"].append({"repeat": arm.get("repeat", 0), **_arm_timing(steps)})
        entry["steps"].extend(steps)
    alone = by_kind.get("alone")
    table = {}
    for kind, entry in by_kind.items():
        pooled = _arm_timing(entry["steps"])
        row = {"pooled": pooled, "repeats": entry["repeats"]}
        if alone is not None:
            base = _arm_timing(alone["steps"])
            row["ratio_excl_compute_median"] = pooled["excl_ms_median"] / base["step_ms_median"]
            row["ratio_excl_compute_mean"] = pooled["excl_ms_mean"] / base["step_ms_mean"]
            row["ratio_raw_median"] = pooled["step_ms_median"] / base["step_ms_median"]
            row["ratio_per_repeat"] = [
                rep["excl_ms_median"] / a["step_ms_median"]
                for rep, a in zip(entry["repeats"], alone["repeats"])
            ]
            row["ratio_median_of_repeats"] = median(row["ratio_per_repeat"])
            row["ratio_cpu_excl_compute_median"] = pooled["excl_cpu_ms_median"] / base["cpu_ms_median"]
        table[kind] = row
    return table


INTERLEAVED = "exchange-async-interleaved"


def _interleaved(arms: list[dict], runs: dict, leaders: list[int], skip: int) -> dict | None:
    """The same-moment estimate: an async arm with interval I > staleness s posts at phase 0 of
    each I-step cycle and consumes at phase s; phase I-1 carries no exchange work at all, so it
    is the group training alone, measured within ~100 ms of the exchange steps (slow load drift
    from other jobs cancels). With m_p the median over cycles of phase p's step time minus its
    exchange compute, the communication overhead per exchange is sum_p m_p - I x m_{I-1}:
    charged to every step it gives the interval-1 ratio 1 + overhead / m_{I-1}, spread over I
    steps the interval-I ratio. The same with main-thread CPU time instead of wall time shows
    what the exchange costs this process, apart from waiting."""
    by_phase: dict[int, list[dict]] = {}
    period = None
    for arm in arms:
        if arm["kind"] != INTERLEAVED:
            continue
        run = runs[arm["name"]]
        period = run["config"]["codistill"]["interval"]
        for p in _probe_steps(run, leaders, skip):
            by_phase.setdefault(p["step"] % period, []).append(p)
    if not period or len(by_phase) < period:
        return None
    wall = [median([p["excl_ms"] for p in by_phase[ph]]) for ph in range(period)]
    cpu = [median([p["main_cpu_ms"] - p["exchange_compute_ms"] for p in by_phase[ph]]) for ph in range(period)]
    over, over_cpu = sum(wall) - period * wall[-1], sum(cpu) - period * cpu[-1]
    return {
        "interval": period, "steps_per_phase": len(by_phase[0]),
        "phase_excl_ms_median": wall, "phase_main_cpu_excl_ms_median": cpu,
        "phase_exchange_ms_median": [median([p["exchange_ms"] for p in by_phase[ph]]) for ph in range(period)],
        "phase_exchange_ms_mean": [mean([p["exchange_ms"] for p in by_phase[ph]]) for ph in range(period)],
        "exchange_compute_ms_median": median([p["exchange_compute_ms"] for p in by_phase[0]]),
        "clean_step_ms_median": wall[-1], "overhead_ms_per_exchange": over,
        "ratio_interval1": 1 + over / wall[-1], "ratio_at_interval": 1 + over / (period * wall[-1]),
        "cpu_overhead_ms_per_exchange": over_cpu,
        "cpu_ratio_interval1": 1 + over_cpu / cpu[-1],
    }


def analyze_overhead(arms: list[dict], skip: int) -> dict:
    runs = {a["name"]: load_run(a["run_dir"], 2) for a in arms}
    table = overhead_table([a for a in arms if a["kind"] != INTERLEAVED], runs, [0, 1], skip)
    ratios = {k: table[k].get("ratio_median_of_repeats") for k in table if k != "alone"}
    best_kind = min((k for k in ratios if ratios[k] is not None and k.startswith("exchange-async")
                     and "alpha1" not in k), key=lambda k: ratios[k], default=None)
    best = ratios.get(best_kind)
    same_moment = _interleaved(arms, runs, [0, 1], skip)
    return {"arms": table, "skip_steps": skip, "goal": 1.05, "ratios_median_of_repeats": ratios,
            "best_async_arm": best_kind, "async_ratio": best,
            "goal_met": best is not None and best <= 1.05,
            "interleaved": same_moment,
            "interleaved_goal_met": bool(same_moment and same_moment["ratio_interval1"] <= 1.05),
            "layout": "2 groups x 1 rank on loopback, alpha 0 except the alpha1 arm"}


def overhead_rows(arms: dict, with_repeats: bool) -> list[str]:
    cols = ["arm", "step ms", "exchange compute ms (excluded)", "exchange_ms (blocked)",
            "step excl. compute ms", "ratio vs alone (pooled)"]
    if with_repeats:
        cols += ["per repeat", "median of repeats", "CPU-time ratio"]
    cols += ["raw ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for kind, row in arms.items():
        p = row["pooled"]
        cells = [kind, fmt(p["step_ms_median"], "{:.1f}"), fmt(p["exchange_compute_ms_median"], "{:.1f}"),
                 fmt(p["exchange_ms_median"], "{:.2f}"), fmt(p["excl_ms_median"], "{:.1f}"),
                 fmt(row.get("ratio_excl_compute_median"), "{:.3f}")]
        if with_repeats:
            cells += [", ".join(f"{x:.2f}" for x in row.get("ratio_per_repeat", [])),
                      fmt(row.get("ratio_median_of_repeats"), "{:.3f}"),
                      fmt(row.get("ratio_cpu_excl_compute_median"), "{:.3f}")]
        cells += [fmt(row.get("ratio_raw_median"), "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def overhead_markdown(o: dict) -> list[str]:
    lines = ["", (f"### (b) Step-time overhead (2 groups x 1 rank, loopback, medians over steps "
                  f">= {o['skip_steps']} of both groups, load {o['load_before'][0]:.1f} -> "
                  f"{o['load_after'][0]:.1f})"), ""]
    lines += overhead_rows(o["arms"], with_repeats=True)
    if o.get("best_async_arm"):
        lines += ["", (f"Headline (alpha-0 async arms, median of per-repeat ratios): "
                       f"`{o['best_async_arm']}` **{o['async_ratio']:.3f}** (goal <= 1.05: "
                       f"{'met' if o['goal_met'] else 'NOT met'}).")]
    i = o.get("interleaved")
    if i:
        ph = ", ".join(f"{x:.1f}" for x in i["phase_excl_ms_median"])
        waits = ", ".join(f"{x:.1f}" for x in i["phase_exchange_ms_mean"])
        lines += ["", (f"Same-moment estimate (async, staleness 2, interval {i['interval']}; the "
                       f"exchange-free phase {i['interval'] - 1} of each cycle is the reference; "
                       f"{i['steps_per_phase']} steps per phase): median step time minus exchange "
                       f"compute by phase [{ph}] ms (mean exchange_ms wait by phase [{waits}]), "
                       f"communication overhead {i['overhead_ms_per_exchange']:.1f} ms per exchange "
                       f"-> wall-clock ratio **{i['ratio_interval1']:.3f}** charged to every step "
                       f"(interval 1), {i['ratio_at_interval']:.3f} at interval {i['interval']}; "
                       f"main-thread CPU ratio {i['cpu_ratio_interval1']:.3f} (interval 1).")]
    return lines

"""Aggregate a regime's runs: results.json and a markdown table per regime, one plot for all.

Every number an arm reports is a mean over its models (2 per codistill or DiLoCo run, 1 for
sync) and seeds; the per-model values stay in results.json so a reader can judge the spread.
Gaps are relative, in percent of the reference arm: (arm - ref) / ref * 100, negative = better.

Bytes across the boundary between the two halves of a run (each rank or worker on its own
node), per run (both sides together):
- codistill arms: measured, the library's `cross_group_bytes` counter (predictions sent);
- DiLoCo: measured at the all-reduce DiLoCo calls (diloco.count_allreduce: the tensors it hands
  to the manager, as a ring all-reduce sends them), 2 (W-1)/W x 4 x P per worker and outer step;
- sync: per update, the same ring all-reduce of the fp32 gradients over its 2 ranks (formula;
  the comm benchmark measures it at the torch.distributed boundary for the same ZeRO-1 setting,
  within 0.1% per step, tests/dist/test_comm_bench.py).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from . import bill, onepass
from .diloco import ring_bytes
from .runner import Run


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _bytes_at(run: Run, group: int, step: int, kind: str) -> float:
    """Boundary bytes this model's side of the run had sent by `step`."""
    if kind == "sync":
        return step * ring_bytes(run.params[group])
    sent = [r["cross_group_bytes"] for r in run.records
            if r["group"] == group and r["step"] <= step and r.get("cross_group_bytes") is not None]
    return float(sent[-1]) if sent else 0.0


def _model_entry(run: Run, group: int, kind: str) -> dict:
    """One model of one run: its losses, best and final steps, agreement and bytes."""
    mine = [r for r in run.records if r["group"] == group]
    hist = run.val_history(group)
    best_step, best = min(hist, key=lambda sv: sv[1])
    agreements = [r["agreement"] for r in mine if r.get("agreement") is not None]
    sides = len(run.groups()) if kind != "sync" else 2
    entry = {
        "seed": run.config["seed"], "group": group, "params": run.params[group],
        "best_val_loss": best, "best_step": best_step,
        "final_val_loss": hist[-1][1], "final_step": hist[-1][0], "stopped_at": run.stopped_at,
        "first_loss": mine[0]["loss"], "final_loss": mine[-1]["loss"],
        "agreement": agreements[-1] if agreements else None,
        # Both sides of the run: what crosses the boundary in either direction.
        "cross_group_bytes": sides * _bytes_at(run, group, hist[-1][0], kind),
        "val_history": hist,
        "bytes_history": [[s, sides * _bytes_at(run, group, s, kind)] for s, _ in hist],
    }
    peers = [r.get("peers") for r in mine if "peers" in r]
    if peers:  # the torchft pair runs at two paces: how many steps had a peer's predictions
        entry["exchanged_fraction"] = sum(1 for p in peers if p) / len(peers)
    teacher = run.run_dir / "teacher" / "metrics.jsonl"
    if teacher.exists():  # the offline student's teacher (hetero.py)
        entry["teacher_best_val_loss"] = min(json.loads(line)["val_loss"] for line in teacher.read_text().splitlines())
    glob = run.val_history(group, "global_val_loss")
    if glob:
        entry["global_val_history"] = glob
        entry["best_global_val_loss"] = min(v for _, v in glob)
    return entry


def _mean_curve(models: list[dict], key: str) -> list[list[float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for m in models:
        for step, val in m[key]:
            by_step[step].append(val)
    return [[step, statistics.fmean(vals)] for step, vals in sorted(by_step.items())]


def _seed_means(models: list[dict], key: str) -> dict[int, float]:
    """Each seed's mean over its models."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for m in models:
        per_seed[m["seed"]].append(m[key])
    return {seed: statistics.fmean(v) for seed, v in sorted(per_seed.items())}


def _seed_spread(models: list[dict], key: str) -> float | None:
    """Standard deviation over seeds of the per-seed mean (None with one seed)."""
    means = list(_seed_means(models, key).values())
    return statistics.stdev(means) if len(means) > 1 else None


def summarize_arm(runs: list[Run], kind: str, note: str = "", counted: dict | None = None) -> dict:
    """An arm's means over models and seeds, plus every model's own values. kind: "sync",
    "codistill" or "diloco" (how its bytes are counted); `counted`: the bill of one update by
    formula (bill.counted), which adds the measured bill and the curves against tokens and FLOPs."""
    models = [_model_entry(run, g, kind) for run in runs for g in run.groups()]
    curve = _mean_curve(models, "val_history")
    out = {
        "kind": kind, "note": note,
        "best_val_loss": _mean([m["best_val_loss"] for m in models]),
        "best_val_loss_seed_sd": _seed_spread(models, "best_val_loss"),
        "best_step": _mean([m["best_step"] for m in models]),
        "mean_curve_best_step": min(curve, key=lambda sv: sv[1])[0],
        "final_val_loss": _mean([m["final_val_loss"] for m in models]),
        "final_val_loss_seed_sd": _seed_spread(models, "final_val_loss"),
        "final_steps": sorted({m["final_step"] for m in models}),
        "stopped": any(run.stopped_at for run in runs),
        "agreement": _mean([m["agreement"] for m in models]),
        "cross_group_bytes": _mean([m["cross_group_bytes"] for m in models]),
        "bytes_counted": "formula" if kind == "sync" else "measured",
        "process_s": _mean([run.process_s for run in runs]),
        "params": models[0]["params"], "seeds": len(runs),
        "per_group": models, "val_curve": curve, "bytes_curve": _mean_curve(models, "bytes_history"),
    }
    if any("best_global_val_loss" in m for m in models):
        out["best_global_val_loss"] = _mean([m.get("best_global_val_loss") for m in models])
    if counted is not None:
        out["bill"] = _bill(runs, counted)
    return out


def _bill(runs: list[Run], counted: dict) -> dict:
    """Counted and measured compute of one update of the whole run (every model)."""
    per_run = [bill.measured(run.records) for run in runs]
    found = [m for m in per_run if m is not None]
    return {**counted, "cpu_s_per_update": _mean([m["cpu_s_mean"] for m in found]),
            "cpu_s_per_update_median": _mean([m["cpu_s_median"] for m in found]),
            "cpu_s_per_update_by_seed": [m and m["cpu_s_mean"] for m in per_run]}


def _gap(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else (value - ref) / ref * 100.0


def paired_ref(arms: dict) -> str | None:
    """The arm the per-seed gaps compare with: sync where the regime has it, else codistill."""
    return next((ref for ref in ("sync", "codistill") if ref in arms), None)


def add_gaps(results: dict) -> None:
    """Relative gaps of every arm to sync and to independent (and to codistill in regimes that
    compare variants of it), for best and final val loss; and the gap of the best val loss to
    `paired_ref` seed by seed. Seed s of every arm shares the data split, the validation windows
    are the same for every seed, and seed s fixes the data order and the initialization (sync,
    codistill's group 0 and DiLoCo start from the same weights), so with seed spreads of 1-5%
    the paired gaps show what the means cannot: whether an arm is above its reference under
    every seed."""
    arms = results["arms"]
    for ref in ("sync", "independent", "codistill"):
        if ref not in arms:
            continue
        for arm in arms.values():
            for key in ("best_val_loss", "final_val_loss"):
                arm[f"{key}_vs_{ref}_pct"] = _gap(arm[key], arms[ref][key])
    ref = paired_ref(arms)
    if ref is None:
        return
    ref_means = _seed_means(arms[ref]["per_group"], "best_val_loss")
    for arm in arms.values():
        mine = _seed_means(arm["per_group"], "best_val_loss")
        arm["best_val_loss_paired_pct"] = {seed: _gap(v, ref_means[seed]) for seed, v in mine.items()
                                           if seed in ref_means}


def _per_seed(a: dict) -> str:
    return ", ".join(f"{v:+.2f}%" for v in a.get("best_val_loss_paired_pct", {}).values()) or "-"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _steps(a: dict) -> str:
    steps = "/".join(str(s) for s in a["final_steps"])
    return f"{steps} (stopped)" if a["stopped"] else steps


COLUMNS = ("arm", "seeds", "best val loss", "sd over seeds", "best at (update)", "final val loss",
           "final at", "best vs sync", "best vs independent", "best vs codistill", "best vs REF, seed by seed",
           "final vs sync",
           "top-1 agreement", "boundary bytes/run", "bytes", "launch s/run", "best val per model")


def _row(name: str, a: dict) -> list[str]:
    gap = [_fmt(a.get(f"best_val_loss_vs_{ref}_pct"), "+.2f", "%") for ref in ("sync", "independent", "codistill")]
    pct = [*gap, _per_seed(a), _fmt(a.get("final_val_loss_vs_sync_pct"), "+.2f", "%")]
    best = f"{a['best_val_loss']:.4f}"
    if "best_global_val_loss" in a:
        best += f" (shared model {a['best_global_val_loss']:.4f})"
    return [name, str(a["seeds"]), best, _fmt(a["best_val_loss_seed_sd"], ".4f"),
            f"{a['best_step']:.0f}", f"{a['final_val_loss']:.4f}", _steps(a), *pct,
            _fmt(a["agreement"], ".3f"), f"{a['cross_group_bytes']:,.0f}", a["bytes_counted"],
            f"{a['process_s']:.0f}", ", ".join(f"{m['best_val_loss']:.4f}" for m in a["per_group"])]


def markdown_table(results: dict) -> str:
    columns = [c.replace("REF", paired_ref(results["arms"]) or "-") for c in COLUMNS]
    lines = [columns, ["---"] * len(columns)]
    lines += [_row(name, arm) for name, arm in results["arms"].items()]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def goals(arms: dict) -> list[str]:
    """docs/design.md's quality goals, met or not, for the arms this regime has."""
    if "codistill" not in arms:
        return []
    c = arms["codistill"]
    lines = []
    if "sync" in arms:
        ratio = c["best_val_loss"] / arms["sync"]["best_val_loss"]
        lines.append(f"codistill best val <= 1.01 x sync's: {'met' if ratio <= 1.01 else 'missed'} "
                     f"({c['best_val_loss']:.4f} vs {arms['sync']['best_val_loss']:.4f}, x{ratio:.4f}; seed by "
                     f"seed {_per_seed(c)}; final {c['final_val_loss']:.4f} vs {arms['sync']['final_val_loss']:.4f})")
    if "independent" in arms:
        ind = arms["independent"]["best_val_loss"]
        lines.append(f"codistill best val below independent's: {'met' if c['best_val_loss'] < ind else 'missed'} "
                     f"({c['best_val_loss']:.4f} vs {ind:.4f})")
    for name, a in arms.items():
        if a["kind"] == "diloco":
            best = min(a["best_val_loss"], a.get("best_global_val_loss", a["best_val_loss"]))
            lines.append(f"codistill best val at or below {name}'s (workers' or shared model's, the lower): "
                         f"{'met' if c['best_val_loss'] <= best else 'missed'} ({c['best_val_loss']:.4f} vs {best:.4f})")
    return lines


HETERO_ROWS = (
    ("benchmark model alone (independent, group 0)", "independent", 0),
    ("benchmark model + benchmark-size peer (codistill-shared, group 0)", "codistill-shared", 0),
    ("benchmark model + small peer (hetero-pair, group 0)", "hetero-pair", 0),
    ("benchmark model on all the data (sync: the offline teacher's recipe)", "sync", 0),
    ("small model alone (small-independent, group 1)", "small-independent", 1),
    ("small model + benchmark-size peer, online (hetero-pair, group 1)", "hetero-pair", 1),
    ("small model distilled offline from the sync-trained model (small-offline)", "small-offline", 1),
)


def hetero_table(arms: dict) -> str:
    """Model by model: does a small peer hurt the large model, and how does the online small
    model compare with the same model alone and distilled offline (means over seeds)."""
    lines = ["| model | params | seeds | best val loss | best at | final val loss | final at |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, arm, group in HETERO_ROWS:
        models = [m for m in arms.get(arm, {}).get("per_group", []) if m["group"] == group]
        if not models:
            continue
        teacher = _mean([m.get("teacher_best_val_loss") for m in models])
        if teacher is not None:
            label += f", teacher best val {teacher:.4f}"
        lines.append(f"| {label} | {models[0]['params']:,} | {len(models)} | "
                     f"{_mean([m['best_val_loss'] for m in models]):.4f} | "
                     f"{_mean([m['best_step'] for m in models]):.0f} | "
                     f"{_mean([m['final_val_loss'] for m in models]):.4f} | "
                     f"{'/'.join(str(m['final_step']) for m in models)} |")
    return "\n".join(lines)


def write_reports(results: dict, out: Path) -> str:
    """OUT/results.json and OUT/results.md for one regime; returns the markdown."""
    add_gaps(results)
    out.mkdir(parents=True, exist_ok=True)
    results["runs_process_s"] = sum(a["process_s"] * a["seeds"] for a in results["arms"].values())
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    r = results["regime"]
    size = "the whole corpus" if r["max_bytes"] is None else f"{r['max_bytes']:,} bytes"
    note = (f"Regime `{r['name']}` (mode `{results['mode']}`): corpus {r['corpus']}, {size}, "
            f"cap {r['steps']} updates per rank, stop rule {r['stop']}; the runs took "
            f"{results['runs_process_s'] / 60:.1f} min (launches included).\n\n"
            f"Command: `{results['command']}`\n")
    met = "".join(f"- {line}\n" for line in goals(results["arms"]))
    if any("bill" in a for a in results["arms"].values()):  # one-pass regimes: the compute axes
        results["onepass"] = onepass.summarize(results)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        met += "".join(f"- {line}\n" for line in onepass.goals(results))
        met += f"\nEqual updates, equal tokens and the compute bill (onepass.py):\n\n{onepass.table(results)}\n"
    if "hetero-pair" in results["arms"]:
        met += f"\n{hetero_table(results['arms'])}\n"
    text = f"{markdown_table(results)}\n\n{met}\n{note}" if met else f"{markdown_table(results)}\n\n{note}"
    (out / "results.md").write_text(text)
    return text

"""Aggregate the quality benchmark's runs: results.json, a markdown table and the val-loss plot.

Every number an arm reports is a mean over its models (2 per codistill run, 1 for sync) and
seeds; the per-model values stay in results.json so a reader can judge the spread. Gaps are
relative, in percent of the reference arm: (arm - ref) / ref * 100, negative = better.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .runner import Run


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _group_entry(run: Run, group: dict) -> dict:
    """One model of one run: its losses, best step, last measured agreement and bytes sent."""
    mine = [r for r in run.records if r["group"] == group["group"]]
    agreements = [r["agreement"] for r in mine if r.get("agreement") is not None]
    best_step = min(group["val_history"], key=lambda sv: sv[1])[0]
    return {
        "seed": run.config["seed"], "group": group["group"],
        "final_val_loss": group["final_val_loss"], "best_val_loss": group["best_val_loss"],
        "best_step": best_step, "first_loss": mine[0]["loss"], "final_loss": group["final_loss"],
        "agreement": agreements[-1] if agreements else None,
        "cross_group_bytes": group["cross_group_bytes"], "val_history": group["val_history"],
    }


def _mean_curve(models: list[dict]) -> list[list[float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for m in models:
        for step, val in m["val_history"]:
            by_step[step].append(val)
    return [[step, statistics.fmean(vals)] for step, vals in sorted(by_step.items())]


def _seed_spread(models: list[dict], key: str) -> float | None:
    """Standard deviation over seeds of the per-seed mean (None with one seed)."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for m in models:
        per_seed[m["seed"]].append(m[key])
    means = [statistics.fmean(v) for v in per_seed.values()]
    return statistics.stdev(means) if len(means) > 1 else None


def summarize_arm(runs: list[Run]) -> dict:
    """An arm's means over models and seeds, plus every model's own values."""
    models = [_group_entry(run, g) for run in runs for g in run.summary["per_group"]]
    curve = _mean_curve(models)
    return {
        "final_val_loss": _mean([m["final_val_loss"] for m in models]),
        "best_val_loss": _mean([m["best_val_loss"] for m in models]),
        "best_val_loss_seed_sd": _seed_spread(models, "best_val_loss"),
        "final_val_loss_seed_sd": _seed_spread(models, "final_val_loss"),
        "mean_curve_best_step": min(curve, key=lambda sv: sv[1])[0],
        "agreement": _mean([m["agreement"] for m in models]),
        "cross_group_bytes": _mean([sum(g["cross_group_bytes"] for g in run.summary["per_group"])
                                    for run in runs]),
        "wall_s": _mean([run.summary["wall_s"] for run in runs]),
        "process_s": _mean([run.process_s for run in runs]),
        "params": runs[0].summary["params"], "seeds": len(runs),
        "per_group": models, "val_curve": curve,
    }


def _gap(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else (value - ref) / ref * 100.0


def add_gaps(results: dict) -> None:
    """Relative gaps of every arm to sync and to independent, for best and final val loss."""
    arms = results["arms"]
    for ref in ("sync", "independent"):
        if ref not in arms:
            continue
        for arm in arms.values():
            for key in ("best_val_loss", "final_val_loss"):
                arm[f"{key}_vs_{ref}_pct"] = _gap(arm[key], arms[ref][key])


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


COLUMNS = ("arm", "seeds", "best val loss", "(sd over seeds)", "mean-curve best at",
           "final val loss", "best vs sync", "best vs independent", "final vs sync",
           "top-1 agreement", "cross-group bytes/run", "loop s/run", "best val per model")


def _row(name: str, a: dict) -> list[str]:
    pct = [_fmt(a.get(key), "+.2f", "%") for key in (
        "best_val_loss_vs_sync_pct", "best_val_loss_vs_independent_pct", "final_val_loss_vs_sync_pct")]
    return [name, str(a["seeds"]), f"{a['best_val_loss']:.4f}",
            _fmt(a["best_val_loss_seed_sd"], ".4f"), str(a["mean_curve_best_step"]),
            f"{a['final_val_loss']:.4f}", *pct, _fmt(a["agreement"], ".3f"),
            f"{a['cross_group_bytes']:,.0f}", f"{a['wall_s']:.0f}",
            ", ".join(f"{m['best_val_loss']:.4f}" for m in a["per_group"])]


def markdown_table(results: dict) -> str:
    lines = [COLUMNS, ["---"] * len(COLUMNS)]
    lines += [_row(name, arm) for name, arm in results["arms"].items()]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def write_reports(results: dict, out: Path) -> str:
    """OUT/results.json and OUT/results.md; returns the markdown table."""
    add_gaps(results)
    out.mkdir(parents=True, exist_ok=True)
    arms = results["arms"].values()
    results["runs_process_s"] = sum(a["process_s"] * a["seeds"] for a in arms)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    mode = results["mode"]
    note = (f"Mode `{mode['name']}`, {mode['steps']} updates per rank, batch "
            f"{mode['micro_batch']} per rank; the runs took {results['runs_process_s'] / 60:.1f} "
            f"min (launches included), this invocation {results['wall_s'] / 60:.1f} min.\n\n"
            f"Command: `{results['command']}`\n")
    (out / "results.md").write_text(f"{table}\n\n{note}")
    return f"{table}\n\n{note}"


def plot_curves(results: dict, path: Path) -> None:
    """Validation loss against step: each arm's mean (thick) over its models (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lows, firsts = [], []
    for i, (name, arm) in enumerate(results["arms"].items()):
        color = f"C{i}"
        for m in arm["per_group"]:
            ax.plot(*zip(*m["val_history"]), color=color, alpha=0.25, linewidth=0.8)
        steps, vals = zip(*arm["val_curve"])
        ax.plot(steps, vals, color=color, linewidth=2, label=f"{name} (curve min {min(vals):.3f})")
        lows.append(min(vals))
        firsts.append(vals[0])
    top = min(max(firsts), min(lows) * 1.3)  # the first evaluations would flatten the tail
    ax.set_ylim(min(lows) - 0.02 * min(lows), top)
    mode = results["mode"]
    ax.set_title(f"quality ({mode['name']}): validation loss, mean of models and seeds")
    ax.set_xlabel("update (per rank)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)

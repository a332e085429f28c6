"""`codistill-ds plot RUN_DIR`: training loss, validation loss and agreement per group, as a PNG."""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

from codistill_ds.run.metrics import read_metrics


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Three panels sharing the step axis; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for rec in read_metrics(run_dir):
        s = series[rec["group"]]
        for key in ("loss", "val_loss", "agreement"):
            if rec.get(key) is not None:
                s[key].append((rec["step"], rec[key]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    titles = {"loss": "training loss", "val_loss": "validation loss", "agreement": "top-1 agreement"}
    for ax, key in zip(axes, titles):
        for group in sorted(series):
            pts = series[group][key]
            if pts:
                ax.plot(*zip(*pts), label=f"group {group}", marker="." if key != "loss" else None)
        ax.set_title(titles[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def cmd_plot(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0

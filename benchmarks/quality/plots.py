"""One figure for every regime: validation loss against update (top row) and against cumulative
bytes across the boundary between the run's two halves (bottom row), one column per regime.
The one-pass regimes get their own figure (`plot_onepass`): one column per per-group batch,
validation loss against update, tokens and counted FLOPs (and measured CPU seconds)."""

from __future__ import annotations

from pathlib import Path

MAX_LABELS = 12


def _limits(arms: dict) -> tuple[float, float]:
    lows = [min(v for _, v in a["val_curve"]) for a in arms.values()]
    firsts = [a["val_curve"][0][1] for a in arms.values()]
    low = min(lows)
    return low - 0.02 * low, min(max(firsts), low * 1.25)  # the first evaluations flatten the tail


def _panel(ax_steps, ax_bytes, results: dict) -> None:
    arms = results["arms"]
    for i, (name, arm) in enumerate(arms.items()):
        style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--", "linewidth": 1.6}
        steps, vals = zip(*arm["val_curve"])
        ax_steps.plot(steps, vals, label=f"{name} ({min(vals):.3f})", **style)
        sent = [(b, v) for (_, b), (_, v) in zip(arm["bytes_curve"], arm["val_curve"]) if b > 0]
        if sent:  # an arm that sends nothing (offline distillation) has no point on a log axis
            xb, yb = zip(*sent)
            ax_bytes.plot(xb, yb, **style)
    low, high = _limits(arms)
    r = results["regime"]
    size = "whole corpus" if r["max_bytes"] is None else f"{r['max_bytes'] / 1e3:,.0f} KB"
    ax_steps.set_title(f"{r['name']}: {r['corpus']} {size}", fontsize=9)
    for ax in (ax_steps, ax_bytes):
        ax.set_ylim(low, high)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax_steps.set_xlabel("update (per rank)", fontsize=8)
    ax_bytes.set_xscale("log")
    ax_bytes.set_xlabel("cumulative boundary bytes (run)", fontsize=8)
    ax_steps.legend(fontsize=6, ncol=1 if len(arms) <= MAX_LABELS // 2 else 2)


def plot_regimes(all_results: list[dict], path: Path) -> None:
    """`path`: a PNG with one column per regime's results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(all_results)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 7.2), squeeze=False)
    for col, results in enumerate(all_results):
        _panel(axes[0][col], axes[1][col], results)
    axes[0][0].set_ylabel("validation loss (nats/byte), mean of models and seeds", fontsize=8)
    axes[1][0].set_ylabel("validation loss (nats/byte)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


ONEPASS_ROWS = (("update", None), ("tokens trained (all models)", "tokens_per_update"),
                ("FLOPs (counted, all models)", "flops_per_update"),
                ("CPU seconds (measured, all models)", "cpu_s_per_update"))


def plot_onepass(all_results: list[dict], path: Path) -> None:
    """`path`: a PNG, one column per one-pass regime (per-group batch), rows = the x axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_results = sorted(all_results, key=lambda r: r["regime"]["micro_batch"])
    n = len(all_results)
    fig, axes = plt.subplots(len(ONEPASS_ROWS), n, figsize=(4.6 * n, 3.2 * len(ONEPASS_ROWS)), squeeze=False)
    for col, results in enumerate(all_results):
        arms = results["arms"]
        low, high = _limits(arms)
        for row, (label, key) in enumerate(ONEPASS_ROWS):
            ax = axes[row][col]
            for i, (name, arm) in enumerate(arms.items()):
                per = 1.0 if key is None else (arm.get("bill") or {}).get(key)
                if not per:
                    continue
                steps, vals = zip(*arm["val_curve"])
                ax.plot([s * per for s in steps], vals, color=f"C{i % 10}", linestyle="-" if i < 10 else "--",
                        linewidth=1.4, label=f"{name} ({vals[-1]:.3f})")
            ax.set_ylim(low, high)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_xlabel(label, fontsize=8)
        r = results["regime"]
        axes[0][col].set_title(f"{r['name']}: per-group batch {r['micro_batch']}, one pass", fontsize=9)
        axes[0][col].legend(fontsize=6)
    for row in range(len(ONEPASS_ROWS)):
        axes[row][0].set_ylabel("validation loss (nats/byte)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)

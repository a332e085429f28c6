"""The ladder's results: steps and tokens to each target per batch (best learning rate), the
McCandlish fit, the measured noise scale, a markdown table and a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .estimate import doubling_ratios, fit_critical_batch, noise_scale


def _key(t: float) -> str:
    return f"{t:g}"


def ladder_rows(records: list[dict], targets: list[float]) -> dict[str, list[dict]]:
    """target -> one row per batch: the learning rate with the fewest steps to that target."""
    by_batch: dict[int, list[dict]] = {}
    for r in records:
        by_batch.setdefault(r["spec"]["batch"], []).append(r)
    out: dict[str, list[dict]] = {}
    for t in targets:
        rows = []
        for b, recs in sorted(by_batch.items()):
            seq = recs[0]["spec"]["seq_len"]
            reached = [(r["crossings"][_key(t)]["steps"], r) for r in recs if _key(t) in r["crossings"]]
            row = {"batch": b, "batch_tokens": b * seq, "lrs_tried": sorted(r["spec"]["lr"] for r in recs)}
            if reached:
                steps, best = min(reached, key=lambda sr: sr[0])
                row.update(steps=steps, tokens=steps * b * seq, lr=best["spec"]["lr"],
                           lr_at_edge=best["spec"]["lr"] in (row["lrs_tried"][0], row["lrs_tried"][-1]))
            else:
                row.update(steps=None, tokens=None, lr=None, lr_at_edge=None)
            rows.append(row)
        out[_key(t)] = rows
    return out


def _rank(rec: dict) -> tuple:
    """Reached the lowest target (fewest steps first), else the lowest final validation loss."""
    low = _key(min(rec["spec"]["targets"])) if rec["spec"]["targets"] else None
    got = rec["crossings"].get(low) if low else None
    return (0, got["steps"]) if got else (1, rec["evals"][-1]["val_loss"])


def best_runs(records: list[dict]) -> dict[int, dict]:
    """Per batch, the run with the fewest steps to the lowest target (else the lowest final
    validation loss): the curves and the noise scale come from it."""
    out: dict[int, dict] = {}
    for r in records:
        b = r["spec"]["batch"]
        if b not in out or _rank(r) < _rank(out[b]):
            out[b] = r
    return out


def noise_at(rec: dict, target: float, band: float) -> dict | None:
    """B_simple of one run pooled over the intervals that end with val loss in [T, T + band];
    if none (coarse evaluations), the interval in which the run crossed T."""
    recs = [n for n in rec["noise"] if target <= n["val_loss"] <= target + band]
    if not recs:
        recs = [n for n in rec["noise"] if n["val_loss"] <= target][:1]
    if not recs:
        return None
    g2 = sum(n["g2"] * n["steps"] for n in recs)
    tr = sum(n["trace"] * n["steps"] for n in recs)
    steps = sum(n["steps"] for n in recs)
    return {"b_simple": noise_scale(g2, tr), "steps_pooled": steps, "g2": g2 / steps, "trace": tr / steps}


def binned_noise(rec: dict, width: float = 0.05) -> list[tuple[float, float, int]]:
    """(mean val loss, pooled B_simple, steps) over the intervals whose end val loss falls in
    each bin of `width`: single intervals early in a run hold a few steps and are too noisy."""
    bins: dict[int, list[dict]] = {}
    for n in rec["noise"]:
        if math.isfinite(n["val_loss"]):
            bins.setdefault(math.floor(n["val_loss"] / width), []).append(n)
    out = []
    for _, ns in sorted(bins.items(), reverse=True):
        steps = sum(n["steps"] for n in ns)
        b = noise_scale(sum(n["g2"] * n["steps"] for n in ns), sum(n["trace"] * n["steps"] for n in ns))
        out.append((sum(n["val_loss"] * n["steps"] for n in ns) / steps, b, steps))
    return out


def summarize(records: list[dict], mode, command: str) -> dict:
    targets = sorted(mode.targets, reverse=True)
    rows = ladder_rows(records, targets)
    seq = mode.seq_len
    fits, doubling, noise = {}, {}, {}
    best = best_runs(records)
    for t in targets:
        pts = [(r["batch"], r["steps"]) for r in rows[_key(t)] if r["steps"] is not None]
        if len(pts) >= 2:
            f = fit_critical_batch([b for b, _ in pts], [s for _, s in pts])
            f.update(E_min_tokens=f["E_min"] * seq, B_crit_tokens=f["B_crit"] * seq, points=len(pts))
            fits[_key(t)] = f
            doubling[_key(t)] = doubling_ratios([b for b, _ in pts], [s for _, s in pts])
        per_batch = {}
        g2_all = tr_all = 0.0
        for b, r in sorted(best.items()):
            got = noise_at(r, t, mode.noise_band)
            if got:
                per_batch[str(b)] = got
                g2_all += got["g2"] * got["steps_pooled"]
                tr_all += got["trace"] * got["steps_pooled"]
        pooled = noise_scale(g2_all, tr_all) if per_batch else None
        noise[_key(t)] = {"per_batch": per_batch, "pooled_b_simple": pooled,
                          "pooled_b_simple_tokens": pooled * seq if pooled is not None else None}
    runs = [{"batch": r["spec"]["batch"], "lr": r["spec"]["lr"], "stop": r.get("stop"), "limit": r["limit"],
             "steps_run": r.get("steps_run"), "windows_read": r.get("windows_read"),
             "train_windows": r["train_windows"], "crossings": r["crossings"], "wall_s": r.get("wall_s"),
             "tokens_per_s": r.get("tokens_per_s"), "final_val": r["evals"][-1]["val_loss"]}
            for r in sorted(records, key=lambda x: (x["spec"]["batch"], x["spec"]["lr"]))]
    first = records[0] if records else {}
    return {
        "command": command, "mode": mode.name,
        "model": {**first.get("spec", {}).get("model", {}), "params": first.get("params")},
        "corpus": {"kind": "stdlib", "train_windows": first.get("train_windows"),
                   "train_tokens": (first.get("train_windows") or 0) * seq,
                   "val_windows_total": first.get("val_windows_total"), "val_windows_scored": mode.val_windows,
                   "seq_len": seq, "val_fraction": mode.val_fraction},
        "targets": targets, "ladder": rows, "fit": fits, "doubling": doubling, "noise": noise, "runs": runs,
        "total_train_s": sum(r.get("train_s", 0.0) for r in records),
        "total_wall_s": sum(r.get("wall_s", 0.0) for r in records),
        "curves": {str(b): {"lr": r["spec"]["lr"], "evals": [(e["step"], e["tokens"], e["val_loss"]) for e in r["evals"]],
                            "noise": binned_noise(r)}
                   for b, r in sorted(best.items())},
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    seq = res["corpus"]["seq_len"]
    lines = [(f"Mode {res['mode']}: {res['model'].get('params') or 0:,}-parameter model, "
              f"{res['corpus']['train_tokens']:,} training tokens (one pass), "
              f"{res['corpus']['val_windows_scored']} validation windows of {seq} bytes."), ""]
    for t, rows in res["ladder"].items():
        lines += [f"Target validation loss {t}:", "",
                  "| batch (seq) | batch (tokens) | best lr | lrs tried | steps to target | tokens to target | S(B)/S(2B) |",
                  "|---|---|---|---|---|---|---|"]
        ratios = {d["batch"]: d["ratio"] for d in res["doubling"].get(t, [])}
        for r in rows:
            edge = " (edge)" if r["lr_at_edge"] else ""
            lines.append(f"| {r['batch']} | {r['batch_tokens']:,} | {_fmt(r['lr'], 'g')}{edge} | "
                         f"{', '.join(f'{x:g}' for x in r['lrs_tried'])} | {_fmt(r['steps'], ',.0f')} | "
                         f"{_fmt(r['tokens'], ',.0f')} | {_fmt(ratios.get(r['batch']), '.2f')} |")
        f = res["fit"].get(t)
        nz = res["noise"].get(t, {})
        if f:
            lines += ["", (f"McCandlish fit S = S_min + E_min/B over {f['points']} batches: S_min = {f['S_min']:,.0f} "
                           f"steps, E_min = {f['E_min_tokens']:,.0f} tokens, **B_crit = {f['B_crit']:.1f} sequences "
                           f"({f['B_crit_tokens']:,.0f} tokens)**, largest residual {100 * f['max_rel_residual']:.1f}%.")]
        if nz.get("pooled_b_simple") is not None:
            per = ", ".join(f"G={b}: {v['b_simple']:.1f}" for b, v in nz["per_batch"].items())
            lines += [(f"Noise scale B_simple near this loss (two-batch estimator, sequences): pooled "
                       f"{nz['pooled_b_simple']:.1f} ({nz['pooled_b_simple_tokens']:,.0f} tokens); per batch {per}.")]
        lines.append("")
    low = f"{min(res['targets']):g}" if res["targets"] else None
    if low:
        lines += [(f"Learning-rate search (steps to {low}; '>N': stopped at N updates, slower than the best; "
                   "'-': not reached in the pass):"), "", "| batch | lr: steps |", "|---|---|"]
        by_batch: dict[int, list[str]] = {}
        for r in res["runs"]:
            got = r["crossings"].get(low)
            cell = (f"{got['steps']:,.0f}" if got else f">{r['steps_run']:,}" if r["stop"] == "slower"
                    else f"(running, at {r['steps_run']:,}, val {r['final_val']:.3f})" if r["stop"] is None
                    else f"- ({r['stop']} at {r['steps_run']:,}, val {r['final_val']:.3f})")
            by_batch.setdefault(r["batch"], []).append(f"{r['lr']:g}: {cell}")
        lines += [f"| {b} | {'; '.join(cells)} |" for b, cells in sorted(by_batch.items())]
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax_s, ax_e, ax_n, ax_c, ax_t, ax_x = axes.flat
    for i, (t, rows) in enumerate(res["ladder"].items()):
        pts = [(r["batch"], r["steps"], r["tokens"]) for r in rows if r["steps"] is not None]
        if not pts:
            continue
        b, s, e = zip(*pts)
        ax_s.plot(b, s, "o-", color=f"C{i}", label=f"target {t}")
        ax_e.plot(b, e, "o-", color=f"C{i}", label=f"target {t}")
        f = res["fit"].get(t)
        if f:
            grid = [min(b) * 2 ** (k / 8) for k in range(int(8 * math.log2(max(b) / min(b))) + 1)]
            ax_s.plot(grid, [f["S_min"] + f["E_min"] / g for g in grid], ":", color=f"C{i}",
                      label=f"fit, B_crit {f['B_crit']:.0f} seq")
            ax_e.plot(grid, [(f["S_min"] + f["E_min"] / g) * g * res["corpus"]["seq_len"] for g in grid], ":",
                      color=f"C{i}")
            ax_s.axvline(f["B_crit"], color=f"C{i}", alpha=0.3)
        ax_s.plot(b, [s[0] * b[0] / x for x in b], "--", color="gray", alpha=0.4, linewidth=0.8)
        nz = res["noise"].get(t, {}).get("pooled_b_simple")
        if nz is not None and math.isfinite(nz):
            ax_s.axvline(nz, color=f"C{i}", linestyle="-.", alpha=0.5)
    for ax, yl in ((ax_s, "steps to target"), (ax_e, "tokens to target")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch (sequences of 128 tokens)" if res["corpus"]["seq_len"] == 128 else "global batch (sequences)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_s.set_title("steps to target (dotted: McCandlish fit; dashed: perfect scaling;\nvertical: B_crit fit, dash-dot: B_simple)", fontsize=8)
    for i, (b, c) in enumerate(res["curves"].items()):
        st = [(s, v) for s, _, v in c["evals"] if s > 0]
        tk = [(k, v) for _, k, v in c["evals"] if k > 0]
        ax_c.plot(*zip(*st), color=f"C{i}", label=f"G={b}, lr {c['lr']:g}")
        ax_t.plot(*zip(*tk), color=f"C{i}", label=f"G={b}")
        nz = [(v, bs) for v, bs, _ in c["noise"] if math.isfinite(bs) and bs > 0]
        if nz:
            ax_n.plot(*zip(*nz), ".-", color=f"C{i}", alpha=0.7, linewidth=0.8, label=f"G={b}")
    for ax, xl in ((ax_c, "step"), (ax_t, "tokens")):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        for t in res["targets"]:
            ax.axhline(t, color="gray", linewidth=0.6, alpha=0.5)
        ax.legend(fontsize=7)
        if res["targets"]:
            ax.set_ylim(min(res["targets"]) - 0.3, None)
    ax_c.set_title("validation loss per batch (best learning rate)", fontsize=8)
    ax_n.set_xlabel("validation loss at the interval's end")
    ax_n.set_ylabel("B_simple (sequences), pooled per 0.05 of val loss")
    ax_n.set_yscale("log")
    ax_n.invert_xaxis()
    ax_n.grid(alpha=0.3)
    ax_n.legend(fontsize=7)
    ax_n.set_title("gradient noise scale along training (best-lr runs)", fontsize=8)
    ax_x.axis("off")
    lines = []
    for t, f in res["fit"].items():
        nz = res["noise"].get(t, {}).get("pooled_b_simple")
        lines.append(f"target {t}: B_crit {f['B_crit']:.1f} seq, S_min {f['S_min']:.0f}, "
                     f"E_min {f['E_min_tokens'] / 1e6:.2f}M tok" + (f"; B_simple {nz:.1f}" if nz else ""))
    ax_x.text(0.0, 1.0, "\n".join(lines) or "no fit yet", va="top", fontsize=9, family="monospace")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(res: dict, out: Path) -> str:
    text = markdown(res)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(text + "\n")
    plot(res, out / "onepass.png")
    return text

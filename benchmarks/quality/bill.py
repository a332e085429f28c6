"""The compute bill of an update: counted (FLOPs) and measured (CPU time), per arm.

Counted: `codistill_ds.plan.compute.update_flops` from the arm's own overrides (model sizes,
batch, groups, exchange batch, interval, alpha, weights mode): every model of the run together.
Measured: the `cpu_ms` of each update (the library's record: the CPU time of the step's
training and exchange work, every thread of every rank of a group summed), summed over the
run's models and averaged over its updates (the first WARMUP left out: allocator and first
calls), evaluation excluded. On a shared machine CPU time is what survives other jobs' load
(wall time does not); cache and memory-bandwidth contention still inflate it by a few percent,
so ratios between arms are compared side by side (`python -m benchmarks.quality.bill`).
"""

from __future__ import annotations

import json
import statistics

from codistill_ds.plan.compute import DecoderShape, update_flops

WARMUP = 5
"""Updates left out of a run's measured bill."""


def overrides(sets: list[str]) -> dict:
    """`key=JSON` overrides as a dict (the runner's own format: settings.arm_overrides)."""
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in sets)}


def shape_of(o: dict, vocab: int = 256) -> DecoderShape:
    """The decoder the overrides build (byte-level vocabulary), its parameters counted as the
    library builds them: untied embedding and lm_head, RMSNorm weights."""
    h, n, f = o["model.hidden_size"], o["model.num_layers"], o["model.intermediate_size"]
    shape = DecoderShape(0, vocab, o["data.seq_len"], h, n, f, o["model.num_heads"], None)
    params = int(shape.matmul_params()) + vocab * h + (2 * n + 1) * h
    return DecoderShape(params, vocab, o["data.seq_len"], h, n, f, o["model.num_heads"], None)


def method_of(o: dict, diloco: int) -> str:
    if diloco:
        return "diloco"
    if not o["codistill.enabled"]:
        return "sync"
    if o["codistill.mode"] == "weights":
        return "weights"
    if o["codistill.exchange_batch"] == "shared":
        return "shared"
    return "independent" if o["codistill.alpha"] == 0 else "train"


def counted(sets: list[str], diloco: int = 0, ranks: int = 2) -> dict:
    """Tokens trained and FLOPs of one update of the whole run (every model), by formula."""
    o = overrides(sets)
    shape = shape_of(o)
    method = method_of(o, diloco)
    b, L = o["data.micro_batch_size"], o["data.seq_len"]
    groups = 1 if method == "sync" else o["codistill.groups"]
    batch = b * ranks if method == "sync" else b  # sync: the global batch over its ranks
    ex = o.get("data.exchange_batch_size") or b
    flops = update_flops(shape, method, groups, batch, o["codistill.interval"], ex, o["codistill.alpha"],
                         o.get("codistill.token_fraction", 1.0))
    return {"method": method, "params": shape.params, "forward_flops_per_token": shape.forward_flops_per_token(),
            "tokens_per_update": groups * batch * L, "flops_per_update": flops}


def measured(records: list[dict], warmup: int = WARMUP) -> dict | None:
    """CPU seconds per update of one run, every model summed: {mean, median, updates}. None when
    the records carry no cpu_ms (runs from before the field existed)."""
    per_model: dict[int, list[float]] = {}
    for r in records:
        if r.get("cpu_ms") is not None and r["step"] > warmup:
            per_model.setdefault(r["group"], []).append(r["cpu_ms"] / 1e3)
    if not per_model:
        return None
    n = min(len(v) for v in per_model.values())
    totals = [sum(v[i] for v in per_model.values()) for i in range(n)]
    return {"cpu_s_mean": statistics.fmean(totals), "cpu_s_median": statistics.median(totals), "updates": n}


# ---- side by side: `python -m benchmarks.quality.bill` ----------------------------------------

SETTINGS: dict[str, tuple[str, tuple[tuple[str, object], ...]]] = {
    "sync": ("sync", ()),
    "train-i1": ("codistill", ()),
    "train-i10": ("codistill", (("codistill.interval", 10),)),
    "train-i50": ("codistill", (("codistill.interval", 50),)),
    "train-i1-tf25": ("codistill", (("codistill.token_fraction", 0.25),)),
    "shared-i1": ("codistill", (("codistill.exchange_batch", "shared"),)),
    "shared-i1-tf25": ("codistill", (("codistill.exchange_batch", "shared"), ("codistill.token_fraction", 0.25))),
    "shared-i10": ("codistill", (("codistill.exchange_batch", "shared"), ("codistill.interval", 10))),
    "weights-i10": ("codistill-weights10", ()),
}
"""Setting name: (the quality arm, extra overrides), at the one-pass regime's per-group batch."""


def side_by_side(out, batch: int, steps: int, repeats: int, names: list[str], timeout_s: float = 1800.0,
                 mode_name: str = "quick") -> dict:
    """Every setting `repeats` times for `steps` updates, in an order rotated per repeat, through
    real launches (runner.cli_starter); returns and writes OUT/bill.json and bill.md."""
    from dataclasses import replace
    from pathlib import Path

    from .runner import cli_starter, read_records, run_once
    from .settings import ARMS, MODES, NPROC, arm_overrides

    out = Path(out)
    mode = MODES[mode_name]
    regime = replace(mode.regimes[f"onepass-b{batch}"], steps=steps, eval_interval=steps)
    found: dict[str, list[dict]] = {n: [] for n in names}
    counted_of: dict[str, dict] = {}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            arm_name, extra = SETTINGS[name]
            arm = replace(ARMS[arm_name], sets=ARMS[arm_name].sets + extra)
            sets = arm_overrides(arm, mode, regime, 1234, [])
            counted_of[name] = counted(sets, arm.diloco, NPROC)
            run_dir = out / "runs" / f"{name}-r{rep}"
            run = run_once(run_dir, {"arm": name, "sets": sets, "repeat": rep}, cli_starter(sets, NPROC),
                           timeout_s, None, 1 if arm_name == "sync" else 2)
            m = measured(run.records)
            step_ms = [r["step_ms"] for r in read_records(run_dir) if r["step"] > WARMUP and "step_ms" in r]
            found[name].append({**m, "step_ms_median": statistics.median(step_ms), "process_s": run.process_s})
            print(f"  bill {name} repeat {rep}: {m['cpu_s_mean'] * 1e3:.0f} ms CPU per update", flush=True)
    ref = statistics.fmean(r["cpu_s_mean"] for r in found["sync"]) if found.get("sync") else None
    rows = {}
    for name, reps in found.items():
        cpu = statistics.fmean(r["cpu_s_mean"] for r in reps)
        c = counted_of[name]
        rows[name] = {**c, "cpu_s_per_update": cpu, "cpu_s_by_repeat": [r["cpu_s_mean"] for r in reps],
                      "cpu_vs_sync": cpu / ref if ref else None,
                      "cpu_vs_sync_by_repeat": [r["cpu_s_mean"] / s["cpu_s_mean"] for r, s in zip(reps, found["sync"])]
                      if ref else None,
                      "flops_vs_sync": c["flops_per_update"] / counted_of["sync"]["flops_per_update"] if ref else None,
                      "step_ms_median": statistics.fmean(r["step_ms_median"] for r in reps)}
    res = {"batch": batch, "steps": steps, "repeats": repeats, "settings": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bill.json").write_text(json.dumps(res, indent=1) + "\n")
    head = ("| setting | method | GFLOPs/update (counted) | FLOPs x sync | CPU s/update (measured) | CPU x sync | "
            "CPU x sync per repeat | step ms (median, wall) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        per = ", ".join(f"{v:.3f}" for v in r["cpu_vs_sync_by_repeat"] or [])
        lines.append(f"| {name} | {r['method']} | {r['flops_per_update'] / 1e9:.2f} | {r['flops_vs_sync'] or 0:.3f} | "
                     f"{r['cpu_s_per_update']:.3f} | {r['cpu_vs_sync'] or 0:.3f} | {per} | {r['step_ms_median']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "bill.md").write_text(text)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.bill",
                                description="compute bill per update of each setting, side by side (real launches)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=64, help="per-group batch (a one-pass regime's)")
    p.add_argument("--mode", default="quick", help="the quality benchmark's mode (smoke: the test)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    args = p.parse_args(argv)
    names = args.settings.split(",")
    if "sync" not in names:
        names = ["sync", *names]
    side_by_side(args.out, args.batch, args.steps, args.repeats, names, mode_name=args.mode)
    print((__import__("pathlib").Path(args.out) / "bill.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Turn the communication benchmark's runs into numbers, tables and the two-node plot.

Inputs per arm: RUN_DIR/summary.json and metrics.jsonl (the product's own record),
RUN_DIR/config.yaml (the resolved config) and RUN_DIR/comm_rank{r}.json (the worker's collective
counters and step-time probe). Byte units are decimal (1 KB = 1,000 bytes), as in `plan`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from codistill_ds.plan import human_bytes, make_plan

BYTE_VOCAB = 256
"""The byte tokenizer's vocabulary: the benchmark trains byte-level models."""


def _load(run_dir: str, world: int | None = None) -> dict:
    d = Path(run_dir)
    summary = json.loads((d / "summary.json").read_text())
    world = world or summary["world_size"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "summary": summary, "records": records,
        "config": yaml.safe_load((d / "config.yaml").read_text()),
        "comm": [json.loads((d / f"comm_rank{r}.json").read_text()) for r in range(world)],
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _wire(comm: dict, phases: tuple[str, ...], scope: str | None = None, op: str | None = None) -> float:
    total = 0.0
    for key, v in comm["counters"].items():
        phase, sc, o = key.split("|")
        if phase in phases and (scope is None or sc == scope) and (op is None or o == op):
            total += v["wire_bytes"]
    return total


# ----------------------------------------------------------------------------- (a) bytes


def _plan_for(run: dict, grad_dtype: str = "fp32", groups: int | None = None, **extra):
    cfg, s = run["config"], run["summary"]
    cd, d = cfg["codistill"], cfg["data"]
    world = s["world_size"]
    k = groups or s["groups"]
    per_group = world // k
    batch = d["exchange_batch_size"] or d["micro_batch_size"] * per_group
    return make_plan(params=s["params"], vocab=BYTE_VOCAB, seq_len=d["seq_len"], batch=batch,
                     topk=cd["topk"], interval=cd["interval"], groups=k, world=world,
                     dtype=cd["dtype"], grad_dtype=grad_dtype, **extra)


def _codistill_bytes(arm: dict, run: dict) -> dict:
    s, cd = run["summary"], run["config"]["codistill"]
    plan = _plan_for(run)
    steps, world, k = s["steps"], s["world_size"], s["groups"]
    per_group = world // k
    n_ex = math.ceil(steps / cd["interval"])
    per_rank = [b for g in s["per_group"] for b in g["cross_group_bytes_per_rank"]]
    total = sum(g["cross_group_bytes"] for g in s["per_group"])
    if cd["route"] == "leaders":
        want_rank = [plan.leader_bytes_per_exchange * n_ex if r % per_group == 0 else 0 for r in range(world)]
    else:
        want_rank = [plan.rail_bytes_per_exchange * n_ex for _ in range(world)]
    counted = sum(_wire(c, ("step", "exchange_thread", "loop"), "cross") for c in run["comm"])
    jsonl_last = {}
    for rec in run["records"]:
        jsonl_last[rec["group"]] = rec["cross_group_bytes"]
    return {
        "name": arm["name"], "route": cd["route"], "topk": cd["topk"], "interval": cd["interval"],
        "staleness": cd["staleness"], "async": cd["async_exchange"], "dtype": cd["dtype"],
        "steps": steps, "exchanges": n_ex, "world": world, "groups": k,
        "exchange_batch": plan.batch, "seq_len": plan.seq_len, "entries_per_token": plan.entries_per_token,
        "params": s["params"],
        "measured_total_bytes": total,
        "measured_bytes_per_step": total / steps,
        "measured_bytes_per_rank": per_rank,
        "metrics_jsonl_cumulative_per_group": [jsonl_last.get(g) for g in range(k)],
        "instrumented_cross_group_wire_bytes": counted,
        "plan_payload_per_group": plan.payload_bytes_per_group,
        "plan_bytes_per_exchange": plan.exchange_bytes_per_exchange,
        "plan_bytes_per_step": plan.exchange_bytes_per_step,
        "plan_bytes_per_rank": want_rank,
        "plan_total_bytes": plan.exchange_bytes_per_exchange * n_ex,
        "equal_to_plan": total == plan.exchange_bytes_per_exchange * n_ex and per_rank == want_rank,
        "per_step_equal_to_plan": total / steps == plan.exchange_bytes_per_step,
        "instrument_agrees": abs(counted - total) < 0.5,
    }


def _sync_bytes(arm: dict, run: dict) -> dict:
    s = run["summary"]
    steps, world = s["steps"], s["world_size"]
    per_rank_ar = [_wire(c, ("step",), op="all_reduce") / steps for c in run["comm"]]
    per_rank_all = [_wire(c, ("step",)) / steps for c in run["comm"]]
    ops: dict[str, float] = {}
    for c in run["comm"]:
        for key, v in c["counters"].items():
            phase, _, op = key.split("|")
            if phase == "step":
                ops[op] = ops.get(op, 0.0) + v["wire_bytes"] / steps / world
    formula_rank = 2 * (world - 1) / world * s["params"] * 4  # fp32 gradients
    return {
        "name": arm["name"], "steps": steps, "world": world, "params": s["params"],
        "grad_bytes": 4, "cross_group_bytes": sum(g["cross_group_bytes"] for g in s["per_group"]),
        "formula_allreduce_bytes_per_rank_per_step": formula_rank,
        "formula_allreduce_bytes_per_step": formula_rank * world,
        "measured_allreduce_bytes_per_rank_per_step": _mean(per_rank_ar),
        "measured_allreduce_bytes_per_step": sum(per_rank_ar),
        "measured_zero_bytes_per_rank_per_step": _mean(per_rank_all),
        "measured_zero_bytes_per_step": sum(per_rank_all),
        "measured_by_op_per_rank_per_step": ops,
        "method": ("instrumented: every torch.distributed collective DeepSpeed calls inside "
                   "train_step, converted to bytes sent per rank with the ring model "
                   "(all-reduce 2(W-1)/W x N, all-gather (W-1) x N_in)"),
    }


def _weights_bytes(arm: dict, run: dict) -> dict:
    """Weight exchange: each rank sends its ZeRO-3 shard to its rail peers every interval."""
    s, cd = run["summary"], run["config"]["codistill"]
    steps, world, k, params = s["steps"], s["world_size"], s["groups"], s["params"]
    per_group = world // k
    n_ex = math.ceil(steps / cd["interval"])
    value = 4 if run["config"]["backend"]["precision"] == "fp32" else 2
    per_rank = [b for g in s["per_group"] for b in g["cross_group_bytes_per_rank"]]
    total = sum(per_rank)
    try:
        plan = _plan_for(run, weight_dtype="fp32" if value == 4 else "bf16")
        plan_per_exchange = plan.weight_bytes_per_exchange
    except TypeError:  # a plan without weight fields: the same formula, K (K-1) P w
        plan_per_exchange = k * (k - 1) * params * value
    counted = sum(_wire(c, ("step", "exchange_thread", "loop"), "cross") for c in run["comm"])
    return {
        "name": arm["name"], "interval": cd["interval"], "steps": steps, "exchanges": n_ex,
        "world": world, "groups": k, "params": params, "value_bytes": value,
        "measured_total_bytes": total, "measured_bytes_per_step": total / steps,
        "measured_bytes_per_rank": per_rank,
        "plan_bytes_per_step": plan_per_exchange / cd["interval"],
        "plan_total_bytes": plan_per_exchange * n_ex,
        "plan_bytes_per_rank": [plan_per_exchange * n_ex / world] * world,
        "measured_over_plan": total / (plan_per_exchange * n_ex),
        "instrumented_cross_group_wire_bytes": counted,
        "note": "ZeRO-3 pads each parameter's partition to a multiple of the group size, so the "
                f"shards hold slightly more than P/S elements ({per_group} ranks per group)",
    }


def analyze_bytes(arms: list[dict], nproc: int, plan1b: dict) -> dict:
    rows, sync, weights = [], None, None
    for arm in arms:
        run = _load(arm["run_dir"], nproc)
        if arm["kind"] == "sync":
            sync = _sync_bytes(arm, run)
        elif arm["kind"] == "weights":
            weights = _weights_bytes(arm, run)
        else:
            rows.append(_codistill_bytes(arm, run))
    ref = next((r for r in rows if r["route"] == "leaders" and r["topk"] == 32 and r["interval"] == 1),
               rows[0])
    ratio = {}
    if sync is not None:
        ref_run = _load(next(a for a in arms if a["name"] == ref["name"])["run_dir"], nproc)
        sync_plan = _plan_for(ref_run)
        ratio = {
            "reference_arm": ref["name"],
            "plan_ratio_fp32_grads": sync_plan.ratio,
            "plan_ratio_bf16_grads": _plan_for(ref_run, "bf16").ratio,
            "measured_allreduce_over_exchange": sync["measured_allreduce_bytes_per_step"] / ref["measured_bytes_per_step"],
            "measured_zero2_over_exchange": sync["measured_zero_bytes_per_step"] / ref["measured_bytes_per_step"],
            "plan_allreduce_bytes_per_step": sync_plan.allreduce_bytes_per_step,
        }
    if weights is not None and sync is not None:
        weights["allreduce_over_weights"] = sync["measured_allreduce_bytes_per_step"] / weights["measured_bytes_per_step"]
    return {"codistill": rows, "sync": sync, "weights": weights, "tiny_ratio": ratio,
            "all_equal_to_plan": all(r["equal_to_plan"] for r in rows),
            "plan_1b": plan1b,
            "plan_1b_goal_met": plan1b["ratio"] >= 1000}


# ----------------------------------------------------------------------------- (b) overhead


def _probe_steps(run: dict, ranks: list[int], skip: int) -> list[dict]:
    out = []
    for r in ranks:
        for p in run["comm"][r]["probe"]:
            if p["step"] >= skip:
                compute = max(0.0, p["post_ms"] - p["comm_call_ms"])
                cpu_compute = max(0.0, p.get("post_cpu_ms", 0.0) - p.get("comm_call_cpu_ms", 0.0))
                out.append({**p, "rank": r, "exchange_compute_ms": compute,
                            "excl_ms": p["step_ms"] - compute,
                            "excl_cpu_ms": p.get("cpu_ms", 0.0) - cpu_compute})
    return out


def _arm_timing(steps: list[dict]) -> dict:
    col = lambda k: [s[k] for s in steps]
    return {
        "n": len(steps),
        "step_ms_median": _median(col("step_ms")), "step_ms_mean": _mean(col("step_ms")),
        "excl_ms_median": _median(col("excl_ms")), "excl_ms_mean": _mean(col("excl_ms")),
        "exchange_compute_ms_median": _median(col("exchange_compute_ms")),
        "exchange_ms_median": _median(col("exchange_ms")), "exchange_ms_mean": _mean(col("exchange_ms")),
        "cpu_ms_median": _median(col("cpu_ms")), "excl_cpu_ms_median": _median(col("excl_cpu_ms")),
    }


def _overhead_table(arms: list[dict], runs: dict, leaders: list[int], skip: int) -> dict:
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
            row["ratio_median_of_repeats"] = _median(row["ratio_per_repeat"])
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
    wall = [_median([p["excl_ms"] for p in by_phase[ph]]) for ph in range(period)]
    cpu = [_median([p.get("main_cpu_ms", 0.0) - max(0.0, p.get("post_cpu_ms", 0.0) - p.get("comm_call_cpu_ms", 0.0))
                    for p in by_phase[ph]]) for ph in range(period)]
    over, over_cpu = sum(wall) - period * wall[-1], sum(cpu) - period * cpu[-1]
    return {
        "interval": period, "steps_per_phase": len(by_phase[0]),
        "phase_excl_ms_median": wall, "phase_main_cpu_excl_ms_median": cpu,
        "phase_exchange_ms_median": [_median([p["exchange_ms"] for p in by_phase[ph]]) for ph in range(period)],
        "phase_exchange_ms_mean": [_mean([p["exchange_ms"] for p in by_phase[ph]]) for ph in range(period)],
        "exchange_compute_ms_median": _median([p["exchange_compute_ms"] for p in by_phase[0]]),
        "clean_step_ms_median": wall[-1], "overhead_ms_per_exchange": over,
        "ratio_interval1": 1 + over / wall[-1], "ratio_at_interval": 1 + over / (period * wall[-1]),
        "cpu_overhead_ms_per_exchange": over_cpu,
        "cpu_ratio_interval1": 1 + over_cpu / cpu[-1],
    }


def analyze_overhead(arms: list[dict], skip: int) -> dict:
    runs = {a["name"]: _load(a["run_dir"], 2) for a in arms}
    table = _overhead_table([a for a in arms if a["kind"] != INTERLEAVED], runs, [0, 1], skip)
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


# ----------------------------------------------------------------------------- (c) two nodes


def _curve(run: dict) -> dict:
    """Per group: cumulative step_ms (s) by step, and (step, val, t) evaluation points."""
    groups: dict[int, dict] = {}
    for rec in sorted(run["records"], key=lambda r: (r["group"], r["step"])):
        g = groups.setdefault(rec["group"], {"t": 0.0, "cum": {}, "val": [], "steps": []})
        g["t"] += rec["step_ms"] / 1e3
        g["cum"][rec["step"]] = g["t"]
        g["steps"].append(rec)
        if rec.get("val_loss") is not None:
            g["val"].append((rec["step"], rec["val_loss"], g["t"]))
    return groups


def _points(groups: dict) -> list[tuple[int, float, float]]:
    """Evaluation points of the arm: group-mean val loss at the slowest group's time."""
    steps = sorted({s for g in groups.values() for s, _, _ in g["val"]})
    pts = []
    for step in steps:
        vals = [v for g in groups.values() for s, v, _ in g["val"] if s == step]
        ts = [t for g in groups.values() for s, _, t in g["val"] if s == step]
        if len(vals) == len(groups):
            pts.append((step, statistics.fmean(vals), max(ts)))
    return pts


def _delta(events: list[dict], i: int) -> dict:
    a, b = events[i]["counters"], events[i + 1]["counters"]
    return {f"{n}_tx_bytes": b[n]["tx_bytes"] - a[n]["tx_bytes"] for n in ("node0", "node1")} | {
        f"{n}_qdisc_drops": (b[n]["qdisc_drops"] or 0) - (a[n]["qdisc_drops"] or 0) for n in ("node0", "node1")}


def analyze_twonode(arms: list[dict], events: list[dict], skip: int, per_node: int = 2) -> dict:
    runs = {a["name"]: _load(a["run_dir"], 2 * per_node) for a in arms}
    out_arms = {}
    for i, arm in enumerate(arms):
        run = runs[arm["name"]]
        groups = _curve(run)
        steps = run["summary"]["steps"]
        link = _delta(events, i) if i + 1 < len(events) else {}
        recs = [r for g in groups.values() for r in g["steps"] if r["step"] > skip]
        out_arms[arm["name"]] = {
            "kind": arm["kind"], "rate": arm.get("rate"), "steps": steps,
            "groups": run["summary"]["groups"], "params": run["summary"]["params"],
            "points": _points(groups),
            "train_s": max(g["t"] for g in groups.values()),
            "loop_wall_s": run["summary"]["wall_s"],
            "step_ms_median": _median([r["step_ms"] for r in recs]),
            "exchange_ms_median": _median([r["exchange_ms"] for r in recs]),
            "best_val_loss": min(p[1] for p in _points(groups)) if _points(groups) else None,
            "cross_group_bytes": sum(g["cross_group_bytes"] for g in run["summary"]["per_group"]),
            "link": link,
            "link_bytes_per_step": {k: v / steps for k, v in link.items() if k.endswith("tx_bytes")},
        }
    rates = []
    for rate in dict.fromkeys(a.get("rate") for a in arms if a["kind"] in ("sync", "codistill")):
        sync, codi = out_arms.get(f"sync-{rate}"), out_arms.get(f"codistill-{rate}")
        if not sync or not codi:
            continue
        target = sync["best_val_loss"]
        t_sync = next(t for _, v, t in sync["points"] if v <= target)
        hit = next(((s, t) for s, v, t in codi["points"] if v <= target), None)
        rates.append({
            "rate": rate, "target_val_loss": target,
            "sync_s_to_target": t_sync,
            "codistill_s_to_target": hit[1] if hit else None,
            "codistill_step_at_target": hit[0] if hit else None,
            "codistill_best_val_loss": codi["best_val_loss"],
            "speedup": (t_sync / hit[1]) if hit else None,
            "goal_met": bool(hit and hit[1] < t_sync),
            "sync_step_ms_median": sync["step_ms_median"],
            "codistill_step_ms_median": codi["step_ms_median"],
            "sync_link_bytes_per_step": sync["link_bytes_per_step"],
            "codistill_link_bytes_per_step": codi["link_bytes_per_step"],
            "link_bytes_ratio": (sum(sync["link_bytes_per_step"].values())
                                 / max(1.0, sum(codi["link_bytes_per_step"].values()))),
        })
    result = {"arms": out_arms, "rates": rates, "link_events": events, "ranks_per_node": per_node}
    over = [a for a in arms if a["kind"].startswith("overhead-")]
    if over:
        fixed = [dict(a, kind=a["kind"].removeprefix("overhead-")) for a in over]
        table = _overhead_table(fixed, runs, [0, per_node], skip)
        result["overhead"] = {"rate": over[0]["rate"], "arms": table,
                              "async_ratio": table.get("exchange-async-stale8", {}).get("ratio_excl_compute_median")}
    return result


def plot_twonode(result: dict, path: Path) -> None:
    n = result.get("ranks_per_node", 2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["rates"]
    if not rates:
        return
    fig, axes = plt.subplots(1, len(rates), figsize=(4.6 * len(rates), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rates):
        for kind, color in (("sync", "tab:red"), ("codistill", "tab:blue")):
            arm = result["arms"][f"{kind}-{r['rate']}"]
            xs = [t for _, _, t in arm["points"]]
            ys = [v for _, v, _ in arm["points"]]
            label = f"sync ZeRO-2, 1 group x {2 * n}" if kind == "sync" else f"codistill, 2 groups x {n}"
            ax.plot(xs, ys, marker="o", ms=3, color=color, label=label)
        ax.axhline(r["target_val_loss"], color="gray", ls="--", lw=0.8, label="target (sync best)")
        ax.set_title(f"link {r['rate']} (tbf, each direction)")
        ax.set_xlabel("training wall-clock (s, sum of step_ms)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown


def _f(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _bytes_md(b: dict) -> list[str]:
    r0 = b["codistill"][0]
    head = (f"### (a) Cross-group bytes per step ({r0['world']} ranks = {r0['groups']} groups x "
            f"{r0['world'] // r0['groups']}, {r0['params']:,} params, exchange batch "
            f"{r0['exchange_batch']} x {r0['seq_len']} tokens, vocab {BYTE_VOCAB}, bf16 values + "
            "int32 indices; measured = the library's `cross_group_bytes` in summary.json)")
    lines = [head, "",
             "| arm | route | k | interval | measured bytes/step | plan bytes/step | measured per rank (run total) | plan per rank | = plan |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in b["codistill"]:
        k = "full" if r["topk"] == 0 else r["topk"]
        plan_rank = [int(x) for x in r["plan_bytes_per_rank"]]
        lines.append(f"| {r['name']} | {r['route']} | {k} | {r['interval']} | "
                     f"{r['measured_bytes_per_step']:,.0f} | {r['plan_bytes_per_step']:,.0f} | "
                     f"{r['measured_bytes_per_rank']} | {plan_rank} | "
                     f"{'yes' if r['equal_to_plan'] else 'NO'} |")
    s = b["sync"]
    if s:
        t = b["tiny_ratio"]
        intro = (f"Synchronous data parallel on the same model (`codistill.enabled=false`, "
                 f"{s['world']} ranks, ZeRO-2, fp32 gradients), {s['method']}:")
        ratio = (f"Ratio for this model against `{t['reference_arm']}`: plan "
                 f"{t['plan_ratio_fp32_grads']:,.0f}x (fp32 gradients; "
                 f"{t['plan_ratio_bf16_grads']:,.0f}x with bf16), measured "
                 f"{t['measured_allreduce_over_exchange']:,.0f}x (all-reduce) and "
                 f"{t['measured_zero2_over_exchange']:,.0f}x (all ZeRO-2 traffic).")
        rows = [("gradient all-reduce, formula 2(W-1)/W x P x 4", "formula_allreduce"),
                ("gradient all-reduce, measured", "measured_allreduce"),
                ("all ZeRO-2 traffic, measured (all-reduce + parameter all-gather)", "measured_zero")]
        lines += ["", intro, "", "| quantity | per rank per step | all ranks per step |", "|---|---|---|"]
        lines += [f"| {name} | {s[key + '_bytes_per_rank_per_step']:,.0f} | {s[key + '_bytes_per_step']:,.0f} |"
                  for name, key in rows]
        lines += ["", ratio]
    p = b["plan_1b"]
    lines += ["", (f"1B parameters (`codistill-ds plan --params 1B --json`: W={p['world']}, "
                   f"K={p['groups']}, B={p['batch']} x L={p['seq_len']}, top-{p['topk']} {p['dtype']}, "
                   f"interval {p['interval']}, {p['grad_dtype']} gradients): exchange "
                   f"{human_bytes(p['exchange_bytes_per_step'])}/step vs all-reduce "
                   f"{human_bytes(p['allreduce_bytes_per_step'])}/step = **{p['ratio']:,.0f}x** "
                   f"(goal >= 1,000x: {'met' if b['plan_1b_goal_met'] else 'NOT met'}).")]
    w, wb = b.get("weights_mode", {}), b.get("weights")
    if wb:
        padding = "" if wb["measured_over_plan"] == 1 else ": ZeRO-3 partition padding"
        lines += ["", (f"Weights mode (`codistill.mode=weights`, ZeRO-3, interval {wb['interval']}, "
                       f"fp32 shards): measured {wb['measured_bytes_per_step']:,.0f} bytes/step "
                       f"(per rank, run total {wb['measured_bytes_per_rank']}), plan K(K-1)P x 4 / I = "
                       f"{wb['plan_bytes_per_step']:,.0f} (measured/plan "
                       f"{wb['measured_over_plan']:.4f}{padding}); gradient all-reduce / weights = "
                       f"{_f(wb.get('allreduce_over_weights'), '{:.2f}')}x.")]
    elif not w.get("validates", True):
        lines += ["", f"Weights mode: skipped ({w.get('error', '')})"]
    else:
        lines += ["", "Weights mode: validates, not run in this mode (smoke)"]
    return lines


def _overhead_rows(arms: dict, with_repeats: bool) -> list[str]:
    cols = ["arm", "step ms", "exchange compute ms (excluded)", "exchange_ms (blocked)",
            "step excl. compute ms", "ratio vs alone (pooled)"]
    if with_repeats:
        cols += ["per repeat", "median of repeats", "CPU-time ratio"]
    cols += ["raw ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for kind, row in arms.items():
        p = row["pooled"]
        cells = [kind, _f(p["step_ms_median"], "{:.1f}"), _f(p["exchange_compute_ms_median"], "{:.1f}"),
                 _f(p["exchange_ms_median"], "{:.2f}"), _f(p["excl_ms_median"], "{:.1f}"),
                 _f(row.get("ratio_excl_compute_median"), "{:.3f}")]
        if with_repeats:
            cells += [", ".join(f"{x:.2f}" for x in row.get("ratio_per_repeat", [])),
                      _f(row.get("ratio_median_of_repeats"), "{:.3f}"),
                      _f(row.get("ratio_cpu_excl_compute_median"), "{:.3f}")]
        cells += [_f(row.get("ratio_raw_median"), "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _twonode_md(c: dict) -> list[str]:
    n = c.get("ranks_per_node", 2)
    lines = ["", (f"### (c) Two simulated nodes (2 namespaces x {n} ranks, veth + tbf, load "
                  f"{c['load_before'][0]:.1f} -> {c['load_after'][0]:.1f})"), "",
             "| link | arm | steps | median step ms | s to target | target val | best val | train s (all steps) | loop s (incl. eval) | link bytes/step node0->1 | node1->0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in c["rates"]:
        for kind in ("sync", "codistill"):
            a = c["arms"][f"{kind}-{r['rate']}"]
            t = r["sync_s_to_target"] if kind == "sync" else r["codistill_s_to_target"]
            lb = a["link_bytes_per_step"]
            lines.append(f"| {r['rate']} | {kind} | {a['steps']} | {_f(a['step_ms_median'], '{:.0f}')} | "
                         f"{_f(t, '{:.1f}')} | {r['target_val_loss']:.4f} | {a['best_val_loss']:.4f} | "
                         f"{a['train_s']:.1f} | {a['loop_wall_s']:.1f} | "
                         f"{_f(lb.get('node0_tx_bytes'))} | {_f(lb.get('node1_tx_bytes'))} |")
    lines.append("")
    for r in c["rates"]:
        lines.append(f"- {r['rate']}: codistillation reaches the sync target in "
                     f"{_f(r['codistill_s_to_target'], '{:.1f}')} s (step "
                     f"{_f(r['codistill_step_at_target'])}) vs {r['sync_s_to_target']:.1f} s "
                     f"(speed-up {_f(r['speedup'], '{:.2f}')}x, goal "
                     f"{'met' if r['goal_met'] else 'NOT met'}); bytes over the link per step, "
                     f"sync / codistill: {r['link_bytes_ratio']:,.0f}x")
    ov = c.get("overhead")
    if ov:
        lines += ["", (f"Overhead over the {ov['rate']} link (2 groups x {n} ranks, one group per "
                       "node, alpha 0):"), ""]
        lines += _overhead_rows(ov["arms"], with_repeats=False)
    return lines


def write_markdown(results: dict) -> str:
    lines = [(f"Command: `{results['command']}` ({results['wall_s']:.0f} s, mode "
              f"{results['mode']['name']}, load average before {results['load_before'][0]:.1f}, "
              f"after {results['load_after'][0]:.1f} on {results['nproc_cpu']} CPUs)"), ""]
    if results.get("bytes"):
        lines += _bytes_md(results["bytes"])
    o = results.get("overhead")
    if o:
        lines += ["", (f"### (b) Step-time overhead (2 groups x 1 rank, loopback, medians over steps "
                       f">= {o['skip_steps']} of both groups, load {o['load_before'][0]:.1f} -> "
                       f"{o['load_after'][0]:.1f})"), ""]
        lines += _overhead_rows(o["arms"], with_repeats=True)
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
    c = results.get("twonode")
    if c and "skipped" in c:
        lines += ["", f"### (c) Two nodes: skipped ({c['skipped']})"]
    elif c:
        lines += _twonode_md(c)
    return "\n".join(lines) + "\n"

"""Part (a) of the communication benchmark: cross-group bytes through real training.

The library's own counters (summary.json `cross_group_bytes`, per rank and per group) for both
routes and several wire formats, checked exactly against `codistill_ds.plan.bytes.make_plan`; the
synchronous baseline's gradient all-reduce measured by the worker's collective counter; weights
mode when it validates. The comparison is like for like (plan.py): one group per node, bytes
per step leaving one node.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from codistill_ds.distributed.launching import REPO, LaunchFailed, child_env
from codistill_ds.plan.bytes import make_plan

from .common import (
    BYTE_VOCAB,
    Mode,
    base_sets,
    fmt,
    load_run,
    mean,
    sets_of,
    wire_bytes,
)


def bytes_arms(mode: Mode, runs: Path, weights: bool) -> list[dict]:
    arms = []
    for route in mode.bytes_routes:
        for k, dtype in mode.bytes_wires:
            name = f"{route}-{'full' if k == 0 else f'top{k}'}{'' if dtype == 'bf16' else '-' + dtype}"
            sets = base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.route": route,
                                      "codistill.topk": k, "codistill.dtype": dtype})
            arms.append({"name": name, "kind": "codistill", "overrides": sets_of(sets)})
    if mode.name != "smoke":  # async, stale, every 2 steps: the interval divides the bytes
        sets = base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.route": "leaders",
                                  "codistill.interval": 2, "codistill.staleness": 2,
                                  "codistill.async_exchange": True})
        arms.append({"name": "leaders-top32-interval2-async", "kind": "codistill",
                     "overrides": sets_of(sets)})
    sets = base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.enabled": False,
                              "codistill.groups": 1})
    arms.append({"name": "sync-allreduce", "kind": "sync", "overrides": sets_of(sets)})
    if weights:  # last: the only ZeRO-3 engine of the job
        arms.append({"name": "weights-interval2", "kind": "weights",
                     "overrides": sets_of(weights_sets(mode))})
    for arm in arms:
        arm["run_dir"] = str(runs / "bytes" / arm["name"])
    return arms


def weights_mode_status(mode: Mode) -> dict:
    """Try `codistill.mode=weights` (ZeRO-3, as the mode requires) through the library's own
    validation, without launching anything: the bytes part measures it only if it validates."""
    from codistill_ds.config import ConfigError, load_config
    from codistill_ds.config.validation import validate

    cfg = load_config(None, sets_of(weights_sets(mode)))
    try:
        validate(cfg, mode.bytes_nproc, 256)
    except ConfigError as err:
        return {"validates": False, "error": str(err), "skipped": True,
                "not_implemented": "not implemented" in str(err).lower()}
    return {"validates": True, "skipped": False}


def weights_sets(mode: Mode) -> dict:
    return base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.mode": "weights",
                              "codistill.interval": 2, "backend.ds_config": "ds_configs/zero3.json"})


COMPACT = ("--topk", "1", "--dtype", "fp8")
"""The most compact wire format the training loop applies today: 4 bytes per position."""


def plan_1b(*flags: str) -> dict:
    """`codistill-ds plan --params 1B --json [flags]`, exactly as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "codistill_ds.cli", "plan", "--params", "1B",
                           "--json", *flags], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise LaunchFailed(f"codistill-ds plan failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- analysis


def _plan_for(run: dict, grad_dtype: str = "fp32", groups: int | None = None, **extra):
    cfg, s = run["config"], run["summary"]
    cd, d = cfg["codistill"], cfg["data"]
    world = s["world_size"]
    k = groups or s["groups"]
    per_group = world // k
    batch = d["exchange_batch_size"] or d["micro_batch_size"] * per_group
    return make_plan(params=s["params"], vocab=BYTE_VOCAB, seq_len=d["seq_len"], batch=batch,
                     topk=cd["topk"], interval=cd["interval"], groups=k, world=world,
                     dtype=cd["dtype"], grad_dtype=grad_dtype,
                     index_dtype=cd.get("index_dtype", "auto"),
                     token_fraction=cd.get("token_fraction", 1.0), **extra)


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
    counted = sum(wire_bytes(c, ("step", "exchange_thread", "loop"), "cross") for c in run["comm"])
    jsonl_last = {}
    for rec in run["records"]:
        jsonl_last[rec["group"]] = rec["cross_group_bytes"]
    return {
        "name": arm["name"], "route": cd["route"], "topk": cd["topk"], "interval": cd["interval"],
        "staleness": cd["staleness"], "async": cd["async_exchange"], "dtype": cd["dtype"],
        "steps": steps, "exchanges": n_ex, "world": world, "groups": k,
        "exchange_batch": plan.batch, "seq_len": plan.seq_len, "entries_per_token": plan.wire["k"],
        "wire": plan.wire["describe"], "wire_bytes_per_position": plan.wire_bytes_per_position,
        "params": s["params"],
        "measured_boundary_bytes_per_step": total / steps / k,
        "plan_boundary_bytes_per_step": plan.boundary["codistill"],
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
    per_rank_ar = [wire_bytes(c, ("step",), op="all_reduce") / steps for c in run["comm"]]
    per_rank_all = [wire_bytes(c, ("step",)) / steps for c in run["comm"]]
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
        "measured_allreduce_bytes_per_rank_per_step": mean(per_rank_ar),
        "measured_allreduce_bytes_per_step": sum(per_rank_ar),
        "measured_zero_bytes_per_rank_per_step": mean(per_rank_all),
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
    counted = sum(wire_bytes(c, ("step", "exchange_thread", "loop"), "cross") for c in run["comm"])
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


def analyze_bytes(arms: list[dict], nproc: int, plan1b: dict, plan1b_compact: dict) -> dict:
    rows, sync, weights = [], None, None
    for arm in arms:
        run = load_run(arm["run_dir"], nproc)
        if arm["kind"] == "sync":
            sync = _sync_bytes(arm, run)
        elif arm["kind"] == "weights":
            weights = _weights_bytes(arm, run)
        else:
            rows.append(_codistill_bytes(arm, run))
    ref = next((r for r in rows if r["route"] == "leaders" and r["topk"] == 32 and r["interval"] == 1),
               rows[0])
    ratio = {}
    if sync is not None:  # like for like: what leaves one node per step (one group per node)
        ref_run = load_run(next(a for a in arms if a["name"] == ref["name"])["run_dir"], nproc)
        codistill = ref["measured_boundary_bytes_per_step"]
        ratio = {
            "reference_arm": ref["name"],
            "ratio_of": "bytes per step leaving one node: sync (a ring rank's share, measured) / "
                        "codistillation (one group's exchange, measured)",
            "plan_ratio_fp32_grads": _plan_for(ref_run).ratios["ring"],
            "plan_ratio_bf16_grads": _plan_for(ref_run, "bf16").ratios["ring"],
            "measured_allreduce_over_exchange": sync["measured_allreduce_bytes_per_rank_per_step"] / codistill,
            "measured_zero2_over_exchange": sync["measured_zero_bytes_per_rank_per_step"] / codistill,
        }
    if weights is not None and sync is not None:
        weights["allreduce_over_weights"] = (sync["measured_allreduce_bytes_per_rank_per_step"]
                                             / (weights["measured_bytes_per_step"] / weights["groups"]))
    goal = 0.1 * plan1b["streaming_diloco_paper_bytes_per_token"]
    return {"codistill": rows, "sync": sync, "weights": weights, "tiny_ratio": ratio,
            "all_equal_to_plan": all(r["equal_to_plan"] for r in rows),
            "plan_1b": plan1b, "plan_1b_compact": plan1b_compact,
            "goal_bytes_per_token": goal,
            "plan_1b_goal_met": plan1b["per_token"]["codistill"] <= goal,
            "plan_1b_compact_goal_met": plan1b_compact["per_token"]["codistill"] <= goal}


def bytes_markdown(b: dict) -> list[str]:
    r0 = b["codistill"][0]
    head = (f"### (a) Cross-group bytes per step ({r0['world']} ranks = {r0['groups']} groups x "
            f"{r0['world'] // r0['groups']}, {r0['params']:,} params, exchange batch "
            f"{r0['exchange_batch']} x {r0['seq_len']} tokens, vocab {BYTE_VOCAB}; measured = the "
            "library's `cross_group_bytes` in summary.json, all groups)")
    lines = [head, "",
             "| arm | wire | interval | measured bytes/step | plan bytes/step | measured per rank (run total) | plan per rank | = plan |",
             "|---|---|---|---|---|---|---|---|"]
    for r in b["codistill"]:
        plan_rank = [int(x) for x in r["plan_bytes_per_rank"]]
        lines.append(f"| {r['name']} | {r['wire']} ({r['wire_bytes_per_position']} B/position) | {r['interval']} | "
                     f"{r['measured_bytes_per_step']:,.0f} | {r['plan_bytes_per_step']:,.0f} | "
                     f"{r['measured_bytes_per_rank']} | {plan_rank} | "
                     f"{'yes' if r['equal_to_plan'] else 'NO'} |")
    s = b["sync"]
    if s:
        t = b["tiny_ratio"]
        intro = (f"Synchronous data parallel on the same model (`codistill.enabled=false`, "
                 f"{s['world']} ranks, ZeRO-2, fp32 gradients), {s['method']}:")
        ratio = (f"Bytes per step leaving one node (one group per node), sync / `{t['reference_arm']}`: "
                 f"plan {t['plan_ratio_fp32_grads']:,.0f}x (fp32 gradients; "
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
    lines += ["", *_plan_1b_lines(b)]
    w, wb = b.get("weights_mode", {}), b.get("weights")
    if wb:
        padding = "" if wb["measured_over_plan"] == 1 else ": ZeRO-3 partition padding"
        lines += ["", (f"Weights mode (`codistill.mode=weights`, ZeRO-3, interval {wb['interval']}, "
                       f"fp32 shards): measured {wb['measured_bytes_per_step']:,.0f} bytes/step "
                       f"(per rank, run total {wb['measured_bytes_per_rank']}), plan K(K-1)P x 4 / I = "
                       f"{wb['plan_bytes_per_step']:,.0f} (measured/plan "
                       f"{wb['measured_over_plan']:.4f}{padding}); gradient all-reduce / weights = "
                       f"{fmt(wb.get('allreduce_over_weights'), '{:.2f}')}x.")]
    elif not w.get("validates", True):
        lines += ["", f"Weights mode: skipped ({w.get('error', '')})"]
    else:
        lines += ["", "Weights mode: validates, not run in this mode (smoke)"]
    return lines


def _plan_1b_lines(b: dict) -> list[str]:
    """The 1B figures like for like, at the defaults and at the compact wire format."""
    lines = []
    for key, label in (("plan_1b", "defaults"), ("plan_1b_compact", " ".join(COMPACT))):
        p = b[key]
        lines.append(
            f"1B parameters, `codistill-ds plan --params 1B --json` ({label}: W={p['world']}, "
            f"K={p['groups']}, {p['batch']} x {p['seq_len']} tokens per group per step, "
            f"{p['wire']['describe']}): {p['per_token']['codistill']:.1f} B per training token "
            f"leave a node vs ring all-reduce {p['per_token']['ring']:,.0f}, Streaming DiLoCo "
            f"{p['per_token']['streaming_diloco']:.1f} (as published: "
            f"{p['streaming_diloco_paper_bytes_per_token']:.1f}); goal <= "
            f"{b['goal_bytes_per_token']:.2f} B/token: "
            f"{'met' if b[key + '_goal_met'] else 'NOT met'}.")
    return lines

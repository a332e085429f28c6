"""Part (c) of the communication benchmark: two simulated nodes (netns.py) joined by a capped veth
link, synchronous ZeRO-2 over both against codistillation with one group per node; wall-clock
to the sync arm's best validation loss, and the bytes the veth really carried."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from codistill_ds.distributed.launching import REPO, LaunchFailed, stop, tail

from .common import (
    ALONE_INTERVAL,
    Mode,
    base_sets,
    bench_env,
    clear_stale_locks,
    fmt,
    fresh_dirs,
    load_run,
    median,
    sets_of,
    worker_argv,
)
from .netns import TwoNodes
from .overhead import overhead_rows, overhead_table


def twonode_arms(mode: Mode, runs: Path) -> list[dict]:
    arms = []
    for rate in mode.rates:
        sync = base_sets(mode, **{
            "train.steps": mode.sync_steps, "train.eval_interval": mode.eval_interval,
            "data.val_batches": mode.val_batches, "codistill.enabled": False, "codistill.groups": 1})
        codi = base_sets(mode, **{
            "train.steps": mode.codistill_steps, "train.eval_interval": mode.eval_interval,
            "data.val_batches": 2 * mode.val_batches,  # half the ranks per model: same windows
            "data.exchange_batch_size": mode.exchange_batch, "codistill.route": "leaders",
            "codistill.staleness": mode.staleness, "codistill.async_exchange": True,
            "codistill.burn_in": 4, "codistill.ramp": 8})
        arms.append({"name": f"sync-{rate}", "kind": "sync", "rate": rate, "link": rate,
                     "overrides": sets_of(sync)})
        arms.append({"name": f"codistill-{rate}", "kind": "codistill", "rate": rate,
                     "link": rate, "overrides": sets_of(codi)})
    if mode.alone_steps:
        rate = mode.rates[-1]
        for kind, extra in (("alone", {"codistill.interval": ALONE_INTERVAL}),
                            ("exchange-async-stale8", {})):
            sets = base_sets(mode, **{
                "train.steps": mode.alone_steps, "codistill.alpha": 0.0,
                "data.exchange_batch_size": mode.exchange_batch, "codistill.staleness": 8,
                "codistill.async_exchange": True, **extra})
            arms.append({"name": f"{kind}-{rate}", "kind": f"overhead-{kind}", "rate": rate,
                         "link": rate, "overrides": sets_of(sets)})
    for arm in arms:
        arm["run_dir"] = str(runs / "twonode" / arm["name"])
    return arms


def launch_two_nodes(arms: list[dict], out: Path, timeout_s: float,
                     ranks_per_node: int) -> tuple[float, list[dict], dict]:
    """All arms in one 2-node job (`ranks_per_node` ranks per namespace); returns (wall s,
    link log, link info).

    Before each arm the worker's rank 0 files a request; this side sets the tbf rate on both
    veth ends, reads the byte counters, and acknowledges. The namespaces are removed on return,
    on error, on timeout and on SIGTERM/SIGINT/SIGHUP."""
    fresh_dirs(arms)
    clear_stale_locks()
    link_dir = out / "link"
    if link_dir.exists():
        shutil.rmtree(link_dir)
    link_dir.mkdir(parents=True)
    job = out / "job_twonode.json"
    job.write_text(json.dumps({"arms": arms, "link_dir": str(link_dir)}, indent=1))
    first_rate = next((a["link"] for a in arms if a.get("link")), "100mbit")
    events: list[dict] = []
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    with TwoNodes(first_rate) as nodes:
        info = {"namespaces": list(nodes.ns), "veth": list(nodes.veth), "addrs": list(nodes.addrs),
                "qdisc": "tbf burst 64kb latency 50ms, both ends"}
        port = "29561"
        try:
            for node in (0, 1):
                extra = ["--nnodes", "2", "--node_rank", str(node), "--master_addr", nodes.addrs[0],
                         "--master_port", port]
                cmd = nodes.command(node, ["env", f"GLOO_SOCKET_IFNAME={nodes.veth[node]}",
                                           *worker_argv(ranks_per_node, job, extra)])
                log = out / f"launch_twonode_node{node}.log"
                logs.append(log)
                with open(log, "w") as fh:
                    fh.write(" ".join(cmd) + "\n")
                    fh.flush()
                    procs.append(subprocess.Popen(cmd, cwd=REPO, env=bench_env(), stdout=fh,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            start = time.perf_counter()
            served = 0
            while True:
                req = link_dir / f"req_{served}.json"
                if req.exists():
                    ask = json.loads(req.read_text())
                    if ask.get("rate") and ask["rate"] != nodes.rate:
                        nodes.set_rate(ask["rate"])
                    events.append({"index": served, "rate": ask.get("rate") or nodes.rate,
                                   "t": time.perf_counter() - start, "counters": nodes.counters()})
                    (link_dir / f"ack_{served}").write_text("ok")
                    served += 1
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0) for c in codes):
                    raise LaunchFailed(f"twonode: a node exited with {codes}; logs:\n"
                                       + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))
                if time.perf_counter() - start > timeout_s:
                    raise LaunchFailed(f"twonode: timed out after {timeout_s:.0f} s; logs:\n"
                                       + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))
                time.sleep(0.05)
            if any(p.returncode != 0 for p in procs):
                raise LaunchFailed("twonode: exit codes "
                                   f"{[p.returncode for p in procs]}; logs:\n"
                                   + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))
        finally:
            stop(procs)
        wall = time.perf_counter() - start
    return wall, events, info


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
    runs = {a["name"]: load_run(a["run_dir"], 2 * per_node) for a in arms}
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
            "step_ms_median": median([r["step_ms"] for r in recs]),
            "exchange_ms_median": median([r["exchange_ms"] for r in recs]),
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
        table = overhead_table(fixed, runs, [0, per_node], skip)
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


def twonode_markdown(c: dict) -> list[str]:
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
            lines.append(f"| {r['rate']} | {kind} | {a['steps']} | {fmt(a['step_ms_median'], '{:.0f}')} | "
                         f"{fmt(t, '{:.1f}')} | {r['target_val_loss']:.4f} | {a['best_val_loss']:.4f} | "
                         f"{a['train_s']:.1f} | {a['loop_wall_s']:.1f} | "
                         f"{fmt(lb.get('node0_tx_bytes'))} | {fmt(lb.get('node1_tx_bytes'))} |")
    lines.append("")
    for r in c["rates"]:
        lines.append(f"- {r['rate']}: codistillation reaches the sync target in "
                     f"{fmt(r['codistill_s_to_target'], '{:.1f}')} s (step "
                     f"{fmt(r['codistill_step_at_target'])}) vs {r['sync_s_to_target']:.1f} s "
                     f"(speed-up {fmt(r['speedup'], '{:.2f}')}x, goal "
                     f"{'met' if r['goal_met'] else 'NOT met'}); bytes over the link per step, "
                     f"sync / codistill: {r['link_bytes_ratio']:,.0f}x")
    ov = c.get("overhead")
    if ov:
        lines += ["", (f"Overhead over the {ov['rate']} link (2 groups x {n} ranks, one group per "
                       "node, alpha 0):"), ""]
        lines += overhead_rows(ov["arms"], with_repeats=False)
    return lines

"""`make demo-ft-faults`: two groups as two jobs; one is killed partway and restarted with --resume.

    .venv/bin/python -m benchmarks.faults.demo --out runs/demo-ft-faults     # about 2 minutes idle

What a new user sees in one command (and in OUT/timeline.png): group 0 never stops while group 1
is down (it trains alone: `peers` 0, and it skips the teacher forward, `exchange_compute_ms` 0);
group 1 comes back from its own newest checkpoint (its steps since that checkpoint are redone)
and both exchange again (`peers` 1). The jobs are the demo's (examples/tiny_cpu.yaml, 2 ranks of
ZeRO-3 each, `codistill.transport=torchft`) with one record per step; the Lighthouse is
`codistill-ds lighthouse`. Everything stays under OUT: each group's run dir and log, the
Lighthouse's log, timeline.png and timeline.json.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from codistill_ds.distributed.launching import (
    REPO,
    child_env,
    signal_tree,
    stop,
    torchrun_argv,
)
from codistill_ds.run.metrics import read_records


def lighthouse(out: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "codistill_ds.cli", "lighthouse", "--port", "0", "--bind",
                             "127.0.0.1"], cwd=REPO, env=child_env(force_cpu=False), stdout=subprocess.PIPE,
                            stderr=(out / "lighthouse.log").open("w"), text=True, start_new_session=True)
    found = re.search(r"listening on (http://\S+)", proc.stdout.readline())
    if not found:
        stop([proc], 2)
        raise SystemExit("demo: the Lighthouse did not start; see " + str(out / "lighthouse.log"))
    return proc, found.group(1)


def group_job(out: Path, g: int, url: str, args: argparse.Namespace, resume: bool) -> subprocess.Popen:
    sets = ["codistill.transport=torchft", f"codistill.group_id={g}", f"codistill.lighthouse={url}",
            f"train.steps={args.steps}", "train.log_interval=1", "train.save_interval=20", "train.eval_interval=0",
            "codistill.exchange_timeout_s=10", "codistill.join_timeout_s=120"]
    argv = ["-m", "codistill_ds.cli", "train", "--config", str(REPO / "examples" / "tiny_cpu.yaml"),
            "--run-dir", str(out / f"group{g}"), "--set", *sets, *(["--resume"] if resume else [])]
    log = (out / f"group{g}.log").open("a")
    return subprocess.Popen(torchrun_argv(args.nproc, argv), cwd=REPO, env=child_env(force_cpu=False), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo-ft-faults")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--kill-at", type=int, default=50, help="group 1's step at which it is killed")
    p.add_argument("--down", type=float, default=5.0, help="seconds group 1 stays down")
    p.add_argument("--nproc", type=int, default=2, help="ranks per group")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("group*"):
        subprocess.run(["rm", "-rf", str(old)], check=False)
    server, url = lighthouse(out)
    t0 = time.monotonic()
    seen: dict[int, list] = {0: [], 1: []}
    keys: dict[int, set] = {0: set(), 1: set()}
    events: dict[str, float] = {}

    def poll() -> None:
        now = time.monotonic() - t0
        for g in (0, 1):
            for r in read_records(out / f"group{g}" / "metrics.jsonl"):
                if (r["step"], r["wall_s"]) not in keys[g]:
                    keys[g].add((r["step"], r["wall_s"]))
                    seen[g].append((round(now, 2), r["step"], r.get("peers"), r.get("exchange_compute_ms")))

    def last(g: int) -> int:
        return max((s for _, s, _, _ in seen[g]), default=0)

    def sleep_until(cond, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end or any(j.poll() not in (None, 0) for j in jobs.values()):
                raise SystemExit(f"demo: stopped waiting (see {out}/group*.log)")
            poll()
            time.sleep(0.2)

    jobs = {g: group_job(out, g, url, args, False) for g in (0, 1)}
    print(f"demo: Lighthouse {url}; groups 0 and 1 started ({args.nproc} ranks each); logs in {out}", flush=True)
    try:
        sleep_until(lambda: last(1) >= args.kill_at and any((out / "group1" / "checkpoints").glob("step_*/COMPLETE")),
                    600)
        killed = jobs.pop(1)
        signal_tree(killed, signal.SIGKILL)
        killed.wait()
        events["kill"] = time.monotonic() - t0
        print(f"demo: killed group 1 at its step {last(1)} ({events['kill']:.0f} s); group 0 trains on alone", flush=True)
        sleep_until(lambda: time.monotonic() - t0 > events["kill"] + args.down, args.down + 60)
        jobs[1] = group_job(out, 1, url, args, True)
        events["restart"] = time.monotonic() - t0
        print(f"demo: restarted group 1 with --resume ({events['restart']:.0f} s)", flush=True)
        for g, job in jobs.items():
            while job.poll() is None:
                poll()
                time.sleep(0.2)
            if job.returncode != 0:
                raise SystemExit(f"demo: group {g} exited {job.returncode}; see {out}/group{g}.log")
        poll()
    finally:
        stop(list(jobs.values()), grace_s=5)
        signal_tree(server, signal.SIGTERM)
    return report(out, seen, events, time.monotonic() - t0)


def report(out: Path, seen: dict, events: dict, wall: float) -> int:
    down = [(t, s, p, c) for t, s, p, c in seen[0] if events["kill"] < t < events["restart"]]
    back = next(((t, s) for t, s, p, _ in seen[1] if t > events["restart"]), None)
    rejoin = next((t for t, _, p, _ in seen[0] if t > events["restart"] and (p or 0) > 0), None)
    alone = [c for _, _, p, c in seen[0] if p == 0 and c is not None]
    summary = {"wall_s": round(wall, 1), **{k: round(v, 1) for k, v in events.items()},
               "group0_steps_while_group1_down": (down[-1][1] - down[0][1]) if len(down) > 1 else 0,
               "group1_resumed_at_step": back[1] if back else None,
               "restart_to_first_step_s": round(back[0] - events["restart"], 1) if back else None,
               "restart_to_exchanging_again_s": round(rejoin - events["restart"], 1) if rejoin else None,
               "group0_steps_alone": len(alone), "group0_exchange_compute_ms_alone_max": max(alone, default=None)}
    (out / "timeline.json").write_text(json.dumps({"summary": summary, "timeline": seen, "events": events}, indent=1))
    plot(out / "timeline.png", seen, events)
    print("demo: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    print(f"demo: wrote {out / 'timeline.png'}", flush=True)
    return 0


def plot(path: Path, seen: dict, events: dict) -> None:
    """Steps against seconds, one line per group, dots coloured by the round's peers (grey: no
    peer); group 1's kill (solid) and restart (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for g, colour in ((0, "C0"), (1, "C1")):
        tl = seen[g]
        ax.plot([t for t, *_ in tl], [s for _, s, *_ in tl], "-", color=colour, lw=1, alpha=0.6, label=f"group {g}")
        for peers, marker in ((0, "x"), (1, "o")):
            pts = [(t, s) for t, s, p, _ in tl if (p or 0) == peers]
            ax.scatter([t for t, _ in pts], [s for _, s in pts], s=8, marker=marker,
                       color=colour if peers else "grey", label=f"group {g}, peers {peers}")
    ax.axvline(events["kill"], color="C1", lw=1.2, label="group 1 killed (SIGKILL)")
    ax.axvline(events["restart"], color="C1", lw=1.2, ls="--", label="group 1 restarted (--resume)")
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("optimizer step")
    ax.set_title("transport torchft: a group killed and restarted; the other trains on")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

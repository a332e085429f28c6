"""Failure benchmark: three groups under a kill schedule, one job per group vs one job for all.

    .venv/bin/python -m benchmarks.faults --out runs/faults --minutes 6 --period 60 --downtime 15

Four arms of `--minutes` each, three codistillation groups of one rank (FSDP2) on this machine:
  ft-clean     transport torchft (a job per group, a Lighthouse), no failure: the reference rate;
  ft-faults    the same, and every `--period` seconds a random group is SIGKILLed (its whole
               process tree, torchft's "punisher" style), restarted `--downtime` s later with
               --resume; the others never stop;
  world-clean  transport world (one 3-rank job): the one-job reference;
  world-faults the same schedule on the one job: the killed rank takes every group down
               (exit 3), the whole job restarts from the last checkpoint `--downtime` s later.
Reported per arm and group, from the groups' own metrics.jsonl polled as they are written:
optimizer steps committed per minute (goodput) against the clean arm, steps lost to restarts,
the survivors' step rate while another group is down, the time from a restart to its first
exchange (from process launch, and from its first training step), the last validation loss.
Writes OUT/results.json after every arm, OUT/results.md and OUT/faults.png at the end.

`--exchange-batch train` runs every arm with `codistill.exchange_batch=train` (each group
predicts on its peers' training batches; synchronous, staleness 0, as that mode needs). Before
anything starts, the torchft arms' config is validated: on a checkout where that mode is not
available over torchft the benchmark stops with the library's one-line reason (exit 2).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from codistill_ds.commands.lighthouse import start_lighthouse
from codistill_ds.distributed.launching import (
    REPO,
    child_env,
    signal_tree,
    stop,
    torchrun_argv,
)
from codistill_ds.run.metrics import read_records

GROUPS = 3
BASE = ["codistill.groups=3", "codistill.alpha=1", "codistill.staleness=1", "codistill.async_exchange=true",
        "backend.name=fsdp", "train.steps=1000000", "train.save_interval=25", "train.keep_checkpoints=2",
        "train.eval_interval=100", "train.log_interval=1", "model.hidden_size=64", "model.num_layers=2",
        "data.micro_batch_size=4", "data.seq_len=64", "model.max_seq_len=64", "optim.warmup_steps=10"]
FT = ["codistill.transport=torchft", "codistill.exchange_timeout_s=5", "backend.peer_timeout_s=60",
      "codistill.join_timeout_s=60"]


MODES = {"shared": [], "train": ["codistill.exchange_batch=train", "codistill.staleness=0"]}
"""`--exchange-batch`: overrides added to every arm (after BASE)."""


def check_mode(extra: list[str]) -> str | None:
    """The library's refusal of the torchft arms' config, or None when it validates."""
    from codistill_ds.config import ConfigError, load_config
    from codistill_ds.config.validation import validate

    cfg = load_config(str(REPO / "examples" / "tiny_cpu.yaml"),
                      [*BASE, *FT, *extra, "codistill.group_id=0", "codistill.lighthouse=http://127.0.0.1:1"])
    try:
        validate(cfg, 1, 256)
    except ConfigError as err:
        return str(err)
    return None


def records(run: Path) -> list[dict]:
    return read_records(run / "metrics.jsonl")


def launch(nproc: int, overrides: list[str], log: Path) -> subprocess.Popen:
    argv = ["-m", "codistill_ds.cli", "train", "--config", str(REPO / "examples" / "tiny_cpu.yaml"), "--set", *overrides]
    return subprocess.Popen(torchrun_argv(nproc, argv), cwd=REPO, env=child_env(), stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


class Watcher:
    """Polls each group's metrics.jsonl; keeps (time, step, peers) of every record it sees."""

    def __init__(self, runs: dict[int, Path], t0: float) -> None:
        self.runs, self.t0 = runs, t0
        self.seen: dict[int, list[tuple[float, int, int | None]]] = {g: [] for g in runs}
        self._keys: dict[int, set] = {g: set() for g in runs}

    def poll(self) -> None:
        """New records only: a resume truncates the file and writes steps again, as new records
        (their wall_s differs), which count as progress again."""
        now = time.monotonic() - self.t0
        for g, run in self.runs.items():
            for r in records(run):
                key = (r.get("step"), r.get("wall_s"))
                if r.get("group") == g and key not in self._keys[g]:
                    self._keys[g].add(key)
                    self.seen[g].append((now, r["step"], r.get("peers")))

    def last_step(self, g: int) -> int:
        return max((s for _, s, _ in self.seen[g]), default=0)

    def first_after(self, g: int, t: float, exchanged: bool) -> float | None:
        return next((tt for tt, _, p in self.seen[g] if tt > t and (not exchanged or (p or 0) > 0)), None)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.25)


def run_arm(name: str, out: Path, minutes: float, period: float, downtime: float, seed: int,
            extra: list[str] = ()) -> dict:
    arm_dir = out / name
    ft, faults = name.startswith("ft"), name.endswith("faults")
    runs = {g: arm_dir / (f"group{g}" if ft else "run") for g in range(GROUPS)}
    server, url = start_lighthouse(port=0, bind="127.0.0.1") if ft else (None, "")
    jobs: dict[int, subprocess.Popen] = {}

    def start(g: int | None, resume: bool) -> None:
        more = [*extra, *(["train.resume=auto"] if resume else [])]
        if ft:
            jobs[g] = launch(1, [*BASE, *FT, f"codistill.group_id={g}", f"codistill.lighthouse={url}",
                                 f"run_dir={runs[g]}", *more], arm_dir / f"group{g}.log")
        else:
            jobs[0] = launch(GROUPS, [*BASE, f"run_dir={runs[0]}", *more], arm_dir / "job.log")

    arm_dir.mkdir(parents=True, exist_ok=True)
    for g in (range(GROUPS) if ft else [None]):
        start(g, False)
    t0 = time.monotonic()
    watch = Watcher(runs, t0)
    watch.sleep(0.1)
    while not all(watch.seen[g] for g in range(GROUPS)) and time.monotonic() - t0 < 600:  # start-up
        watch.sleep(1)
    start_s = time.monotonic() - t0
    rng, events = random.Random(seed), []
    end = start_s + minutes * 60
    next_kill = start_s + period
    try:
        while time.monotonic() - t0 < end:
            now = time.monotonic() - t0
            if faults and now >= next_kill and now + downtime < end - 10:
                g = rng.randrange(GROUPS)
                events.append(kill(g, ft, jobs, runs, watch, now))
                watch.sleep(downtime)
                events[-1]["restart_s"] = time.monotonic() - t0
                start(g if ft else None, True)
                next_kill += period
            watch.sleep(1)
    finally:
        stop(list(jobs.values()), grace_s=5)
        if server is not None:
            server.shutdown()
    watch.poll()
    return summarize(name, watch, runs, events, start_s, end, ft)


def kill(g: int, ft: bool, jobs: dict, runs: dict, watch: Watcher, now: float) -> dict:
    """SIGKILL group g: its whole job (transport torchft) or its rank in the one job (world)."""
    before = {h: watch.last_step(h) for h in range(GROUPS)}
    if ft:
        signal_tree(jobs[g], signal.SIGKILL)
        jobs[g].wait()
    else:
        beat = json.loads((runs[0] / "health" / f"rank_{g}.json").read_text())
        subprocess.run(["kill", "-9", str(beat["pid"])], check=False)
        try:
            jobs[0].wait(timeout=120)  # the other ranks notice and exit 3 (health.Watchdog)
        except subprocess.TimeoutExpired:
            signal_tree(jobs[0], signal.SIGKILL)
    return {"group": g, "kill_s": now, "steps_before": before}


def summarize(name: str, watch: Watcher, runs: dict, events: list, start_s: float, end: float, ft: bool) -> dict:
    minutes = (end - start_s) / 60
    groups = {}
    for g in range(GROUPS):
        run = runs[g] if ft else runs[0]
        final = [r for r in records(run) if r.get("group") == g]
        vals = [r["val_loss"] for r in final if r.get("val_loss") is not None]
        seen = watch.seen[g]
        # Steps recomputed after restarts: progress past the checkpoint a kill threw away.
        lost = 0
        for ev in events:
            if ft and ev["group"] != g:
                continue
            resumed = next((s for t, s, _ in seen if t > ev["restart_s"]), None)
            if resumed is not None:
                lost += max(0, ev["steps_before"][g] - (resumed - 1))
        groups[g] = {"committed_steps": final[-1]["step"] if final else 0,
                     "goodput_steps_per_min": (final[-1]["step"] if final else 0) / minutes,
                     "steps_lost_to_restarts": lost, "last_val_loss": vals[-1] if vals else None,
                     "timeline": [(round(t, 2), s, p) for t, s, p in seen]}
    for ev in events:  # survivors while a group is down, and the restarted group's rejoin
        g, k, r = ev["group"], ev["kill_s"], ev["restart_s"]
        first_step = watch.first_after(g, r, exchanged=False)
        first_exchange = watch.first_after(g, r, exchanged=True)
        ev["restart_to_first_step_s"] = None if first_step is None else first_step - r
        ev["restart_to_first_exchange_s"] = None if first_exchange is None else first_exchange - r
        ev["first_step_to_first_exchange_s"] = (None if first_exchange is None or first_step is None
                                                else first_exchange - first_step)
        back = first_step if first_step is not None else end
        ev["survivor_steps_per_min"] = {h: _rate(watch.seen[h], k, back) for h in range(GROUPS) if h != g}
    return {"arm": name, "minutes": minutes, "start_up_s": start_s, "groups": groups, "events": events}


def _rate(seen: list, t0: float, t1: float) -> float | None:
    inside = [(t, s) for t, s, _ in seen if t0 <= t <= t1]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / ((inside[-1][0] - inside[0][0]) / 60)


def report(results: dict, out: Path) -> None:
    lines = ["| arm | group | goodput (steps/min) | vs clean | steps lost | last val loss |", "|---|---|---|---|---|---|"]
    for name, arm in results["arms"].items():
        clean = results["arms"].get(name.replace("faults", "clean"))
        for g, row in arm["groups"].items():
            base = clean["groups"][g]["goodput_steps_per_min"] if clean else None
            ratio = f"{row['goodput_steps_per_min'] / base:.3f}" if base else "-"
            val = f"{row['last_val_loss']:.4f}" if row["last_val_loss"] is not None else "-"
            lines.append(f"| {name} | {g} | {row['goodput_steps_per_min']:.1f} | {ratio} | "
                         f"{row['steps_lost_to_restarts']} | {val} |")
    lines += ["", ("| arm | killed group at (s) | survivors' steps/min while it was down (vs clean) | "
                   "restart -> first step (s) | first step -> first exchange (s) |"), "|---|---|---|---|---|"]
    for name, arm in results["arms"].items():
        clean = results["arms"].get(name.replace("faults", "clean"))
        for ev in arm["events"]:
            rates = []
            for h, rate in ev["survivor_steps_per_min"].items():
                base = clean["groups"][h]["goodput_steps_per_min"] if clean else None
                rates.append(f"g{h} {rate:.0f} ({rate / base:.2f})" if rate and base else f"g{h} -")
            f = lambda x: "-" if x is None else f"{x:.1f}"
            lines.append(f"| {name} | g{ev['group']} at {ev['kill_s']:.0f} | {', '.join(rates)} | "
                         f"{f(ev['restart_to_first_step_s'])} | {f(ev['first_step_to_first_exchange_s'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "faults.png")


def plot(results: dict, path: Path) -> None:
    """Steps against time, one line per group: widths shrink with the group id so groups that
    run in step (the clean arms, world-faults) stay visible under one another; a kill is a solid
    line and its restart a dashed one, in the killed group's colour (black: the whole job)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.6), sharey=True)
    for ax, name in zip(axes if len(arms) > 1 else [axes], arms):
        arm = results["arms"][name]
        groups = list(arm["groups"])
        for i, (g, row) in enumerate(arm["groups"].items()):
            tl = row["timeline"]
            ax.plot([t for t, _, _ in tl], [s for _, s, _ in tl], "-", color=f"C{i}",
                    lw=1.0 + 1.5 * (len(groups) - 1 - i), alpha=0.8, label=f"group {g}")
        for ev in arm["events"]:
            g = str(ev["group"])
            color = f"C{groups.index(g)}" if name.startswith("ft") and g in groups else "black"
            ax.axvline(ev["kill_s"], color=color, lw=0.8)
            ax.axvline(ev["restart_s"], color=color, lw=0.8, ls="--")
        ax.set_title(name)
        ax.set_xlabel("seconds since launch")
    (axes[0] if len(arms) > 1 else axes).set_ylabel("optimizer step (solid: kill, dashed: restart)")
    (axes[0] if len(arms) > 1 else axes).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=6.0, help="training time per arm")
    p.add_argument("--period", type=float, default=60.0, help="seconds between kills")
    p.add_argument("--downtime", type=float, default=15.0, help="seconds a killed group stays down")
    p.add_argument("--arms", default="ft-clean,ft-faults,world-clean,world-faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange-batch", choices=sorted(MODES), default="shared",
                   help="codistill.exchange_batch of every arm (train: staleness 0)")
    args = p.parse_args(argv)
    why = check_mode(MODES[args.exchange_batch])
    if why is not None:
        print(f"faults: --exchange-batch {args.exchange_batch} is refused by this checkout: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m benchmarks.faults " + " ".join(sys.argv[1:] if argv is None else argv),
               "settings": vars(args), "arms": {}}
    for name in args.arms.split(","):
        results["arms"][name] = run_arm(name, out, args.minutes, args.period, args.downtime, args.seed,
                                        MODES[args.exchange_batch])
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"[faults] {name} done", flush=True)
    report(results, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Part `ft` of the communication benchmark: a step of `transport: torchft` against a step of
`transport: world` on the same config, arms alternated a few steps at a time.

    .venv/bin/python -m benchmarks.comm --out runs/comm-ft --parts ft            # every case
    .venv/bin/python -m benchmarks.comm --out runs/comm-ft --parts ft --ft-cases K2S1I1ds

A case is (K groups, S ranks per group, exchange interval I, backend). Its two arms train the
demo's config (examples/tiny_cpu.yaml: ZeRO-3 or FSDP2, alpha 1 from step 0, synchronous
exchange, staleness 0) shrunk to the model of RESULTS "Failures" (`MODEL`: where the 1.44x was
measured; the smaller the step, the larger a fixed per-round cost looks), with the same overrides: `world` is one launch of K x S ranks; `ft` is a Lighthouse
(`codistill-ds lighthouse`, its defaults) and K launches of S ranks, one per group. Both are
launched together and held at a gate (`gate.py`): the orchestrator lets one arm run a block of
steps, then the other, alternating which goes first, so each block of one arm has the same
steps of the other within seconds of it, under the same load. Per step the arm's time is the
mean over its group leaders' `step_ms` (metrics.jsonl: forward, backward, optimizer, the
teacher forward and the exchange; the gate's wait is not in it); the first step of every block
is left out (woken from the gate). The case's ratio is the median over steps of ft / world on
the same step index (interval 1), or the median over blocks of the ratio of the blocks' summed
step times (interval > 1: every block holds one exchange step, never as its first step).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from codistill_ds.distributed.launching import REPO, signal_tree, stop, torchrun_argv

from .common import bench_env, clear_stale_locks

GOAL = 1.05
CONFIG = REPO / "examples" / "tiny_cpu.yaml"
MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=256", "data.micro_batch_size=4",
         "data.seq_len=64", "model.max_seq_len=64"]
"""RESULTS "Failures"' model: a 2-layer hidden-64 Llama, 4 x 64 bytes per rank and step."""
BACKENDS = {"ds": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
            "fsdp": ["backend.name=fsdp"]}


@dataclass(frozen=True)
class Case:
    groups: int
    ranks: int
    interval: int
    backend: str

    @property
    def name(self) -> str:
        return f"K{self.groups}S{self.ranks}I{self.interval}{self.backend}"


@dataclass(frozen=True)
class Schedule:
    """Steps of one case: `warmup` steps per arm (start-up, first exchange), then `blocks`
    blocks of `block` steps per arm, alternated."""

    warmup: int
    block: int
    blocks: int

    @property
    def steps(self) -> int:
        return self.warmup + self.block * self.blocks + 1  # the last step (evaluation) is not timed


def schedule_for(interval: int, blocks: int) -> Schedule:
    """Interval 1: blocks of 6 steps. Interval I > 1: blocks of I steps starting half an interval
    past an exchange, so every block holds exactly one exchange step and never as its first."""
    if interval == 1:
        return Schedule(warmup=6, block=6, blocks=blocks)
    return Schedule(warmup=interval + interval // 2, block=interval, blocks=max(3, blocks * 2 // 3))


def all_cases() -> list[Case]:
    return [Case(k, s, i, b) for b in ("ds", "fsdp") for i in (1, 10) for s in (1, 2) for k in (2, 3, 4)]


def select_cases(spec: str | None) -> list[Case]:
    """`K2S1I1ds,K3...`, or a regular expression over the names; None: every case."""
    cases = all_cases()
    if not spec:
        return cases
    wanted = [c for c in cases if any(re.fullmatch(p.strip(), c.name) for p in spec.split(","))]
    if not wanted:
        raise SystemExit(f"comm: no ft case matches {spec!r}; names look like {cases[0].name}")
    return wanted


# ----------------------------------------------------------------------------- launching


def _lighthouse(out: Path) -> tuple[subprocess.Popen, str]:
    """`codistill-ds lighthouse` with its defaults on a free port; returns (process, URL)."""
    log = out / "lighthouse.log"
    proc = subprocess.Popen([sys.executable, "-m", "codistill_ds.cli", "lighthouse", "--port", "0",
                             "--bind", "127.0.0.1"], cwd=REPO, env=bench_env(), stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, start_new_session=True)
    line = proc.stdout.readline()
    found = re.search(r"listening on (http://\S+)", line)
    if not found:
        stop([proc], 2)
        raise RuntimeError(f"the Lighthouse did not start: {line!r}")
    return proc, found.group(1)


def _job(nproc: int, gate: Path, arm: str, overrides: list[str], log: Path) -> subprocess.Popen:
    argv = ["-m", "benchmarks.comm.gate", str(CONFIG), str(gate), arm, *overrides]
    return subprocess.Popen(torchrun_argv(nproc, argv), cwd=REPO, env=bench_env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _overrides(case: Case, sched: Schedule, extra: tuple[str, ...]) -> list[str]:
    return [f"codistill.groups={case.groups}", f"codistill.interval={case.interval}", "codistill.staleness=0",
            "codistill.burn_in=0", "codistill.ramp=0", "codistill.alpha=1.0", f"train.steps={sched.steps}",
            "train.log_interval=1", "train.eval_interval=0", "train.save_interval=0", "data.val_batches=1",
            "codistill.join_timeout_s=900", "backend.timeout_s=900", *MODEL, *BACKENDS[case.backend], *extra]


class Steps:
    """Completed steps per group leader, read from the runs' metrics.jsonl as they grow."""

    def __init__(self, files: dict[str, Path], groups: int) -> None:
        self.files, self.groups = files, groups
        self.records: dict[str, list[dict]] = {name: [] for name in files}
        self._pos = {name: 0 for name in files}

    def poll(self) -> None:
        for name, path in self.files.items():
            if not path.exists():
                continue
            with path.open() as fh:
                fh.seek(self._pos[name])
                chunk = fh.read()
            done = chunk.rfind("\n") + 1
            self._pos[name] += done
            self.records[name] += [json.loads(x) for x in chunk[:done].splitlines() if x.strip()]

    def done(self, arm: str) -> int:
        """Steps every group of `arm` has completed."""
        recs = [r for name, rs in self.records.items() if name.split("/")[0] == arm for r in rs]
        last = {g: 0 for g in range(self.groups)}
        for r in recs:
            last[r["group"]] = max(last[r["group"]], r["step"])
        return min(last.values())


def run_case(case: Case, sched: Schedule, out: Path, extra: tuple[str, ...], timeout_s: float) -> dict:
    """Launch both arms, drive the gate through the schedule, return the per-step records."""
    d = out / case.name
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*/metrics.jsonl"):
        old.unlink()
    gate = d / "gate.json"
    allowed = {"world": 0, "ft": 0}
    _write_gate(gate, allowed)
    common = _overrides(case, sched, extra)
    lighthouse, url = _lighthouse(d)
    jobs = {"world": _job(case.groups * case.ranks, gate, "world", [*common, f"run_dir={d / 'world'}"],
                          d / "world.log")}
    for g in range(case.groups):
        jobs[f"ft{g}"] = _job(case.ranks, gate, "ft", [*common, "codistill.transport=torchft", f"codistill.group_id={g}",
                                                      f"codistill.lighthouse={url}", f"run_dir={d / f'ft{g}'}"],
                              d / f"ft{g}.log")
    files = {"world/0": d / "world" / "metrics.jsonl", **{f"ft/{g}": d / f"ft{g}" / "metrics.jsonl"
                                                         for g in range(case.groups)}}
    steps = Steps(files, case.groups)
    start, load = time.monotonic(), os.getloadavg()
    try:
        def advance(arm: str, to: int, limit: float) -> None:
            allowed[arm] = to
            _write_gate(gate, allowed)
            deadline = time.monotonic() + limit
            while steps.done(arm) < to:
                for name, job in jobs.items():
                    if job.poll() is not None and not (job.returncode == 0 and steps.done(arm) >= to):
                        raise RuntimeError(f"{case.name}: {name} exited ({job.returncode}); see {d}/{name}.log")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{case.name}: {arm} did not reach step {to} within {limit:.0f} s")
                time.sleep(0.02)
                steps.poll()

        advance("world", sched.warmup, timeout_s)
        advance("ft", sched.warmup, timeout_s)
        for j in range(sched.blocks):
            for arm in (("world", "ft") if j % 2 == 0 else ("ft", "world")):
                advance(arm, sched.warmup + (j + 1) * sched.block, timeout_s / 3)
        for arm in ("world", "ft"):
            allowed[arm] = sched.steps
        _write_gate(gate, allowed)
        for name, job in jobs.items():
            if job.wait(timeout=timeout_s / 3) != 0:
                raise RuntimeError(f"{case.name}: {name} exited ({job.returncode}); see {d}/{name}.log")
        steps.poll()
    finally:
        stop(list(jobs.values()), grace_s=5)
        signal_tree(lighthouse, 15)
        lighthouse.wait()
    return {"case": asdict(case), "name": case.name, "schedule": asdict(sched), "wall_s": time.monotonic() - start,
            "load_before": load, "load_after": os.getloadavg(), "records": steps.records}


def _write_gate(path: Path, allowed: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(allowed))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- analysis


def arm_steps(records: dict[str, list[dict]], arm: str) -> dict[int, float]:
    """Step index (0-based) -> mean of the group leaders' step_ms, for steps every group logged."""
    per: dict[int, list[float]] = {}
    for name, recs in records.items():
        if name.split("/")[0] == arm:
            for r in recs:
                per.setdefault(r["step"] - 1, []).append(r["step_ms"])
    width = max((len(v) for v in per.values()), default=0)
    return {s: statistics.fmean(v) for s, v in per.items() if len(v) == width}


def analyze_case(run: dict) -> dict:
    sched = Schedule(**run["schedule"])
    world, ft = arm_steps(run["records"], "world"), arm_steps(run["records"], "ft")
    blocks, per_step = [], []
    for j in range(sched.blocks):
        first = sched.warmup + j * sched.block
        timed = [s for s in range(first + 1, first + sched.block) if s in world and s in ft]
        if not timed:
            continue
        blocks.append(sum(ft[s] for s in timed) / sum(world[s] for s in timed))
        per_step += [ft[s] / world[s] for s in timed]
    interval = run["case"]["interval"]
    headline = statistics.median(per_step if interval == 1 else blocks) if blocks else None
    timed_all = [s for s in range(sched.warmup, sched.steps - 1) if s in world and s in ft
                 and (s - sched.warmup) % sched.block]
    exch = [r.get("exchange_ms") or 0.0 for name, rs in run["records"].items() if name.startswith("ft/")
            for r in rs if r["step"] - 1 in timed_all]
    return {"name": run["name"], **run["case"], "ratio": headline, "goal_met": headline is not None and headline <= GOAL,
            "ratio_blocks": blocks, "ratio_steps_median": statistics.median(per_step) if per_step else None,
            "ratio_blocks_median": statistics.median(blocks) if blocks else None,
            "world_step_ms": statistics.median([world[s] for s in timed_all]) if timed_all else None,
            "ft_step_ms": statistics.median([ft[s] for s in timed_all]) if timed_all else None,
            "ft_exchange_ms_mean": statistics.fmean(exch) if exch else None,
            "timed_steps": len(timed_all), "wall_s": run["wall_s"], "load": [run["load_before"][0], run["load_after"][0]]}


def ft_markdown(result: dict) -> list[str]:
    lines = ["", "### Step time of transport torchft against transport world (same config, arms alternated)", "",
             ("| case | K | S | interval | backend | world step ms | torchft step ms | torchft / world | "
              "per block | goal <= 1.05 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, f="{:.1f}": "-" if x is None else f.format(x)
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['name']} | | | | | failed: {c['error'][:80]} | | | | |")
            continue
        met = "-" if c["interval"] != 1 else ("met" if c["goal_met"] else "**not met**")
        lines.append(f"| {c['name']} | {c['groups']} | {c['ranks']} | {c['interval']} | {c['backend']} | "
                     f"{fmt(c['world_step_ms'])} | {fmt(c['ft_step_ms'])} | **{fmt(c['ratio'], '{:.3f}')}** | "
                     f"{', '.join(f'{x:.2f}' for x in c['ratio_blocks'])} | {met} |")
    return lines


def run_ft(cases: list[Case], blocks: int, out: Path, extra: tuple[str, ...], timeout_s: float) -> dict:
    """Every case in turn; a failed case is reported and the next one runs."""
    clear_stale_locks()
    result: dict = {"goal": GOAL, "cases": []}
    for case in cases:
        t0 = time.monotonic()
        try:
            run = run_case(case, schedule_for(case.interval, blocks), out / "ft", extra, timeout_s)
            (out / "ft" / case.name / "records.json").write_text(json.dumps(run))
            row = analyze_case(run)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            row = {"name": case.name, **asdict(case), "error": str(err)}
        result["cases"].append(row)
        print(f"[comm] ft {case.name}: ratio {row.get('ratio')} ({time.monotonic() - t0:.0f} s)", flush=True)
        (out / "results_ft.partial.json").write_text(json.dumps(result, indent=1))
    met = [c["goal_met"] for c in result["cases"] if c.get("interval") == 1 and "error" not in c]
    result["goal_met_interval1"] = bool(met) and all(met)
    return result

"""Launch one run of the quality benchmark, watch it, and read back what it wrote.

CLI arms are real `codistill-ds train` launches (torchrun, DeepSpeed, gloo), exactly as a user
would start them, so the benchmark measures the product and not a copy of its loop; DiLoCo and
hetero runs are several processes (diloco.py, hetero.py) writing the same metrics.jsonl
records. A failed or hung run stops the benchmark: a table with a silently missing arm would
read as a result.

Runs are resumable: a run dir holds settings.json (arm and overrides) and, once finished, done.json;
a rerun with equal settings reuses it, anything else is trained afresh. A regime with a stop
rule ends a run once every model has clearly passed its validation minimum (settings.StopRule).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from codistill_ds.distributed.launching import REPO, child_env, stop, tail
from codistill_ds.run import metrics

from .settings import StopRule

TAIL_CHARS = 4000
"""How much of a failed run's logs is printed."""
POLL_S = 5.0
"""How often a running launch's metrics are read for the stop rule."""
EXIT_POLL_S = 0.1
"""How often the launch's processes are checked for having exited: a run's end is seen at
once, not up to POLL_S later (the smoke's arms last seconds each)."""


class RunFailed(RuntimeError):
    """A run exited non-zero, timed out or wrote no records; the message has its logs' tail."""


@dataclass
class Run:
    """One finished run: its metrics.jsonl records, resolved config and how it ended."""

    run_dir: Path
    records: list[dict]
    config: dict
    """The resolved config (of group 0's job when the groups ran as separate jobs)."""
    params: dict[int, int]
    """Parameters of each group's model (groups of a hetero pair differ)."""
    process_s: float
    """Wall time of the whole launch (start-up included)."""
    stopped_at: int | None
    """The update at which the stop rule ended the run (None: it trained every update)."""

    def groups(self) -> list[int]:
        return sorted({r["group"] for r in self.records})

    def val_history(self, group: int, key: str = "val_loss") -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if r["group"] == group and r.get(key) is not None]

    def brief(self) -> str:
        best = [min(v for _, v in self.val_history(g)) for g in self.groups()]
        final = [self.val_history(g)[-1][1] for g in self.groups()]
        end = f", stopped at {self.stopped_at}" if self.stopped_at else ""
        return (f"best val {sum(best) / len(best):.4f}, final val {sum(final) / len(final):.4f} "
                f"({self.process_s:.0f} s{end})")


def _logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.relative_to(run_dir)} tail:\n{tail(p, TAIL_CHARS)}"
                     for p in sorted(run_dir.glob("**/*.log")))


def job_dirs(run_dir: Path) -> list[Path]:
    """Where a run's jobs write: the run dir, or one `group<g>` dir per job (transport torchft)."""
    return sorted(run_dir.glob("group*")) or [run_dir]


def read_records(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl record the run's jobs have written so far."""
    return [r for d in job_dirs(run_dir) for r in metrics.read_records(d / "metrics.jsonl")]


def val_histories(run_dir: Path) -> list[list[tuple[int, float]]]:
    """Every model's (step, val_loss) so far, from the records written up to now."""
    by_group: dict[int, list[tuple[int, float]]] = {}
    for r in read_records(run_dir):
        if r.get("val_loss") is not None:
            by_group.setdefault(r["group"], []).append((r["step"], r["val_loss"]))
    return list(by_group.values())


def watch(procs: Sequence[subprocess.Popen], run_dir: Path, timeout_s: float,
          rule: StopRule | None, models: int) -> int | None:
    """Wait for every process; returns the update the stop rule ended the run at (None if it
    ran to the end). A non-zero exit or the timeout stops every process and raises RunFailed;
    an interrupt (Ctrl-C, SIGTERM made an exception) stops them and propagates."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                stop(procs)
                raise RunFailed(f"run {run_dir} failed (exit code {failed[0].returncode}):\n{_logs(run_dir)}")
            if time.monotonic() > deadline:
                stop(procs)
                raise RunFailed(f"run {run_dir} timed out after {timeout_s:.0f} s:\n{_logs(run_dir)}")
            hist = val_histories(run_dir)
            if rule is not None and len(hist) == models and rule.passed(hist):
                stop(procs)
                return min(h[-1][0] for h in hist)
            wait_for_an_exit(procs, POLL_S)
    except BaseException:
        stop(procs)
        raise
    failed = [p for p in procs if p.returncode != 0]
    if failed:
        raise RunFailed(f"run {run_dir} failed (exit code {failed[0].returncode}):\n{_logs(run_dir)}")
    return None


def wait_for_an_exit(procs: Sequence[subprocess.Popen], seconds: float) -> None:
    """Sleep up to `seconds`, returning as soon as any of the processes has exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(EXIT_POLL_S)


Starter = Callable[[Path], tuple[list[subprocess.Popen], Callable[[], None]]]
"""Starts a run's processes in its (fresh) run dir; returns them and what to call once they end."""


def run_once(run_dir: Path, settings: dict, start: Starter, timeout_s: float, rule: StopRule | None,
             models: int, rerun: bool = False, reuse_root: Path | None = None) -> Run:
    """The run in `run_dir`: reused when it (or, under `reuse_root`, another regime's run) finished
    with equal settings and stop rule, else trained now."""
    if not rerun:
        found = finished(run_dir, settings, rule) or (reuse_root and find_finished(reuse_root, settings, rule))
        if found:
            return read_run(found)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to: a stale one would mix two runs
    run_dir.mkdir(parents=True)
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    began = time.perf_counter()
    procs, cleanup = start(run_dir)
    try:
        stopped = watch(procs, run_dir, timeout_s, rule, models)
    finally:
        cleanup()
    meta = {"process_s": time.perf_counter() - began, "stopped_at": stopped, "stop": str(rule)}
    (run_dir / "done.json").write_text(json.dumps(meta) + "\n")
    return read_run(run_dir)


def finished(run_dir: Path, settings: dict, rule: StopRule | None) -> Path | None:
    """run_dir if it finished with these settings; a stopped run counts only under an equal
    stop rule (a run that trained every update always counts)."""
    done, path = run_dir / "done.json", run_dir / "settings.json"
    if not done.exists() or not path.exists():
        return None
    if json.loads(path.read_text()) != json.loads(json.dumps(settings)):
        return None
    meta = json.loads(done.read_text())
    if meta["stopped_at"] is not None and meta.get("stop") != str(rule):
        return None
    return run_dir


def find_finished(root: Path, settings: dict, rule: StopRule | None) -> Path | None:
    """A finished run with these settings anywhere under root/REGIME/runs (regimes share arms)."""
    for path in sorted(root.glob("*/runs/*/settings.json")):
        if finished(path.parent, settings, rule):
            return path.parent
    return None


def read_run(run_dir: Path) -> Run:
    records = read_records(run_dir)
    if not any(r.get("val_loss") is not None for r in records):
        raise RunFailed(f"run {run_dir} wrote no validation records:\n{_logs(run_dir)}")
    configs = {g: yaml.safe_load((d / "config.yaml").read_text()) for g, d in enumerate(job_dirs(run_dir))}
    groups = sorted({r["group"] for r in records})
    params = {g: model_params(json.dumps(configs.get(g, configs[0])["model"], sort_keys=True)) for g in groups}
    meta = json.loads((run_dir / "done.json").read_text())
    return Run(run_dir, records, configs[0], params, meta["process_s"], meta["stopped_at"])


@cache
def model_params(model_section: str) -> int:
    """Parameters of the run's replica, rebuilt from its config (a stopped run has no summary)."""
    from codistill_ds.backends.model import build_model, count_parameters
    from codistill_ds.config import ModelConfig

    return count_parameters(build_model(ModelConfig(**json.loads(model_section)), 256, 0.0, 0))


def cli_starter(sets: list[str], nproc: int) -> Starter:
    """`codistill-ds train --nproc N --set ...` in the run dir."""
    def start(run_dir: Path) -> tuple[list[subprocess.Popen], Callable[[], None]]:
        cmd = [sys.executable, "-m", "codistill_ds.cli", "train", "--run-dir", str(run_dir),
               "--nproc", str(nproc)]
        for item in sets:
            cmd += ["--set", item]
        return [popen(cmd, run_dir, "train")], lambda: None
    return start


def popen(cmd: list[str], run_dir: Path, name: str, **env: str) -> subprocess.Popen:
    """A process in its own session (stop() ends its whole group), logs under run_dir/name.*."""
    (run_dir / f"{name}.command.txt").write_text(" ".join(cmd) + "\n")
    with open(run_dir / f"{name}.out.log", "w") as out, open(run_dir / f"{name}.err.log", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(force_cpu=False, **env), stdout=out,
                                stderr=err, start_new_session=True)

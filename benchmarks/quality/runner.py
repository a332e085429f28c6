"""Run one `codistill-ds train` job for the quality benchmark and read back what it wrote.

Each run is a real CLI launch (torchrun, DeepSpeed, gloo), exactly as a user would start it, so
the benchmark measures the product and not a copy of its loop. A failed or hung run stops the
benchmark: a quality table with a silently missing arm would read as a result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from codistill_ds.launching import REPO, child_env, tail, wait_or_stop

TAIL_CHARS = 4000
"""How much of a failed run's stderr is printed."""


class RunFailed(RuntimeError):
    """A training run exited non-zero, timed out or wrote no summary; the message has its tail."""


@dataclass
class Run:
    """One finished run: its summary.json, metrics.jsonl records and resolved config."""

    run_dir: Path
    summary: dict
    records: list[dict]
    config: dict
    process_s: float
    """Wall time of the whole launch (start-up included); summary['wall_s'] is the loop only."""

    def brief(self) -> str:
        groups = self.summary["per_group"]
        best = sum(g["best_val_loss"] for g in groups) / len(groups)
        final = sum(g["final_val_loss"] for g in groups) / len(groups)
        return f"best val {best:.4f}, final val {final:.4f} ({self.process_s:.0f} s)"


def _wait(proc: subprocess.Popen, timeout_s: float, run_dir: Path) -> None:
    """Wait for the launcher; a timeout or an interrupt (Ctrl-C) takes the run down with it."""
    rc = wait_or_stop(proc, timeout_s)
    if rc is None:
        raise RunFailed(f"run {run_dir} timed out after {timeout_s:.0f} s; stderr tail:\n"
                        f"{tail(run_dir / 'stderr.log', TAIL_CHARS)}")
    if rc != 0:
        raise RunFailed(f"run {run_dir} failed with exit code {rc}; stderr tail:\n"
                        f"{tail(run_dir / 'stderr.log', TAIL_CHARS)}\nstdout tail:\n"
                        f"{tail(run_dir / 'stdout.log', TAIL_CHARS)}")


def read_run(run_dir: Path, process_s: float) -> Run:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RunFailed(f"run {run_dir} exited 0 but wrote no summary.json; stderr tail:\n"
                        f"{tail(run_dir / 'stderr.log', TAIL_CHARS)}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return Run(run_dir, json.loads(summary_path.read_text()), records, config, process_s)


def launch(run_dir: Path, sets: list[str], nproc: int, timeout_s: float, resume: bool) -> Run:
    """`codistill-ds train --nproc N --set ...` into a fresh `run_dir` (or reuse one if asked)."""
    timing = run_dir / "process_s.txt"
    if resume and (run_dir / "summary.json").exists() and timing.exists():
        return read_run(run_dir, float(timing.read_text()))
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to: a stale one would mix two runs
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "codistill_ds.cli", "train", "--run-dir", str(run_dir),
           "--nproc", str(nproc)]
    for item in sets:
        cmd += ["--set", item]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    start = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(force_cpu=False), stdout=out, stderr=err,
                                start_new_session=True)
        _wait(proc, timeout_s, run_dir)
    process_s = time.perf_counter() - start
    timing.write_text(f"{process_s:.3f}\n")
    return read_run(run_dir, process_s)

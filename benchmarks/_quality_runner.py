"""Run one `codistill-ds train` job for the quality benchmark and read back what it wrote.

Each run is a real CLI launch (torchrun, DeepSpeed, gloo), exactly as a user would start it, so
the benchmark measures the product and not a copy of its loop. A failed or hung run stops the
benchmark: a quality table with a silently missing arm would read as a result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
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


def child_env() -> dict[str, str]:
    """One thread per rank (2 ranks on 2 cores), CPU DeepSpeed unless the caller chose, offline."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-TAIL_CHARS:]


def _stop(proc: subprocess.Popen) -> None:
    """End the launcher's process group; torchrun passes SIGTERM on to its ranks."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(proc: subprocess.Popen, timeout_s: float, run_dir: Path) -> None:
    """Wait for the launcher; a timeout or an interrupt (Ctrl-C) takes the run down with it."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise RunFailed(f"run {run_dir} timed out after {timeout_s:.0f} s; stderr tail:\n"
                        f"{_tail(run_dir / 'stderr.log')}") from None
    except BaseException:
        _stop(proc)
        raise
    if rc != 0:
        raise RunFailed(f"run {run_dir} failed with exit code {rc}; stderr tail:\n"
                        f"{_tail(run_dir / 'stderr.log')}\nstdout tail:\n"
                        f"{_tail(run_dir / 'stdout.log')}")


def read_run(run_dir: Path, process_s: float) -> Run:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RunFailed(f"run {run_dir} exited 0 but wrote no summary.json; stderr tail:\n"
                        f"{_tail(run_dir / 'stderr.log')}")
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
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=err,
                                start_new_session=True)
        _wait(proc, timeout_s, run_dir)
    process_s = time.perf_counter() - start
    timing.write_text(f"{process_s:.3f}\n")
    return read_run(run_dir, process_s)

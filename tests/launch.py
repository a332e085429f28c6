"""Start real ranks for a test: torchrun on loopback with gloo, results back through files.

Each worker script is an importable module with a `main()` (accelerate's test-script style);
torchrun gives it RANK/WORLD_SIZE, it writes `OUT/rank{r}.json`, and the test asserts on those
numbers. A timeout stops the whole launch (launcher and ranks) and fails the test instead of
stalling CI. The launching itself is `codistill_ds.distributed.launching`, shared with the benchmarks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from codistill_ds.distributed.launching import (
    REPO,
    child_env,
    free_port,
    run_captured,
    torchrun_argv,
)
from codistill_ds.run.metrics import read_records

__all__ = ["REPO", "WORKERS", "child_env", "cli", "free_port", "read_jsonl", "run_captured", "run_worker", "torchrun"]

WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun(nproc: int, argv: list[str], timeout: float = 240, cwd: Path | None = None,
             **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc argv...`; argv is a script path or `-m module ...`."""
    return run_captured(torchrun_argv(nproc, argv), timeout, cwd=cwd or REPO, env=child_env(**env))


def run_worker(name: str, nproc: int, out: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run tests/workers/NAME.py on nproc ranks; return each rank's JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun(nproc, [str(WORKERS / f"{name}.py"), str(out), *args], timeout=timeout)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def cli(nproc: int, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """The real `codistill-ds` entry point under torchrun."""
    return torchrun(nproc, ["-m", "codistill_ds.cli", *args], timeout=timeout, **env)


def read_jsonl(path: Path) -> list[dict]:
    """A JSONL file's complete records; [] before it exists. Safe on a file a running job is
    appending to (`codistill_ds.run.metrics.read_records`: a torn last line is left out)."""
    return read_records(path)

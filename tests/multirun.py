"""The test side of tests/workers/runs.py: several runs in one launch of a worker, each run's
per-rank JSON results back by name."""

from __future__ import annotations

import json
from pathlib import Path

from launch import WORKERS, torchrun


def run_args(runs: dict[str, list[str]]) -> list[str]:
    return [a for name, sets in runs.items() for a in (f"@{name}", *sets)]


def run_worker_runs(name: str, nproc: int, out: Path, args: list[str], runs: dict[str, list[str]],
                    timeout: float = 240, **env: str) -> dict[str, list[dict]]:
    """tests/workers/NAME.py OUT *args @R1 ... @R2 ... on nproc ranks; {run: each rank's JSON}."""
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun(nproc, [str(WORKERS / f"{name}.py"), str(out), *args, *run_args(runs)], timeout=timeout, **env)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return {run: [json.loads((out / run / f"rank{r}.json").read_text()) for r in range(nproc)] for run in runs}

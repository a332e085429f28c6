"""Launches shared by test_checkpoint.py and test_failures.py (cached for the pytest session).

`straight(backend)`: 4 ranks (2 groups x 2) train 8 steps without interruption, saving at
steps 4 and 8, with asynchronous exchanges 2 steps stale so that checkpoints hold in-flight
peer targets; FSDP2 runs send half of the positions (token_fraction 0.5), ZeRO-3 runs sampled
targets. Every interrupted run is compared against it. Both backends' straight runs come from
one launch (ZeRO-3 then FSDP2 on the same ranks, tests/workers/runs.py), the first time either
is asked for.
`launch_ranks`: start the ranks as separate processes WITHOUT a launcher, so that when one dies
nothing kills the others: they must notice and exit by themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

from multirun import run_args

from launch import REPO, WORKERS, child_env, free_port, read_jsonl, torchrun

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS = 8
PEER_TIMEOUT_S = 30
COMMON = [f"train.steps={STEPS}", "train.save_interval=4", "train.eval_interval=4",
          "codistill.alpha=1", "codistill.staleness=2", "codistill.async_exchange=true",
          f"backend.peer_timeout_s={PEER_TIMEOUT_S}"]
WORKER = str(WORKERS / "ckpt_run.py")


BY_BACKEND = {"fsdp": ["codistill.token_fraction=0.5"], "deepspeed": ["codistill.targets=samples"]}
"""What each backend's runs exchange besides the default, so that every resume test also resumes
what the checkpoint must carry for it (issue 24, item 7): under token_fraction the positions of
the targets in flight; under sampled targets, draws that a resumed run must repeat exactly."""


def overrides(run_dir: Path, backend: str, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"backend.name={backend}", *COMMON, *BY_BACKEND[backend], *extra]


def results(out: Path, nproc: int = 4) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def run_torchrun(out: Path, sets: list[str], *launcher: str, timeout: float = 400, **env: str) -> list[dict]:
    proc = torchrun(4, [*launcher, WORKER, str(out), CONFIG, *sets], timeout=timeout, **env)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return results(out)


def straight(backend: str) -> Path:
    """Out dir of the uninterrupted run; its run dir is OUT/run."""
    return straight_runs()[backend]


@cache
def straight_runs() -> dict[str, Path]:
    """Each backend's uninterrupted run, one after the other in one launch of 4 ranks."""
    out = Path(tempfile.mkdtemp(prefix="straight_"))
    runs = {b: [f"run_dir={out / b / 'run'}", f"backend.name={b}", *BY_BACKEND[b]] for b in ("deepspeed", "fsdp")}
    proc = torchrun(4, [WORKER, str(out), CONFIG, *COMMON, *run_args(runs)], timeout=600)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return {b: out / b for b in runs}


def by_group_step(run_dir: Path) -> dict[tuple[int, int], dict]:
    return {(r["group"], r["step"]): r for r in read_jsonl(run_dir / "metrics.jsonl")}


def launch_ranks(nproc: int, argv: list[str], logs: Path, **env: str) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for r in range(nproc):
        e = child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        with open(logs / f"rank{r}.out", "w") as out, open(logs / f"rank{r}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=e, stdout=out, stderr=err))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, float]]:
    """(return code, monotonic exit time) per process; kills everything left at the timeout."""
    done: dict[int, tuple[int, float]] = {}
    until = time.monotonic() + timeout
    while len(done) < len(procs) and time.monotonic() < until:
        for i, p in enumerate(procs):
            if i not in done and p.poll() is not None:
                done[i] = (p.returncode, time.monotonic())
        time.sleep(0.05)
    for i, p in enumerate(procs):
        if i not in done:
            p.kill()
            p.wait()
            done[i] = (None, float("inf"))
    return [done[i] for i in range(len(procs))]


def assert_same_training(ref_out: Path, out: Path, first_step: int) -> None:
    """Losses, validation, agreement, peers' predictions and final weights are identical."""
    ref, got = by_group_step(ref_out / "run"), by_group_step(out / "run")
    assert ref.keys() == got.keys(), (sorted(ref), sorted(got))
    for key, rec in ref.items():
        for field in ("loss", "distill_loss", "agreement", "val_loss", "alpha", "skipped_peers"):
            assert got[key].get(field) == rec.get(field), (key, field, got[key].get(field), rec.get(field))
    for a, b in zip(results(ref_out), results(out)):
        assert a["weights"] == b["weights"], (a["rank"], "final weights differ")
        steps = [s for s in a["sent"] if int(s) >= first_step]
        assert steps and all(b["sent"][s] == a["sent"][s] for s in steps), a["rank"]
        assert all(b["recv"][s] == a["recv"][s] for s in steps if s in a["recv"]), a["rank"]

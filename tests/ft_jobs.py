"""Group jobs of `transport: torchft` for a test: a real in-process Lighthouse, one torchrun job
per group running tests/workers/ckpt_run.py (the CLI run with recorders), and their records.
The same pattern as tests/dist/test_independent_groups.py, shared by the tests that launch
torchft jobs against a world job."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from launch import REPO, WORKERS, child_env, free_port, read_jsonl

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
CKPT_RUN = str(WORKERS / "ckpt_run.py")


def lighthouse(**kw):
    """(server, url) of a Lighthouse on loopback; `server.shutdown()` when done."""
    from codistill_ds.commands.lighthouse import start_lighthouse

    return start_lighthouse(port=0, bind="127.0.0.1", **kw)


def start_job(nproc: int, out: Path, overrides: list[str], log: Path, **env: str) -> subprocess.Popen:
    """ckpt_run.py on `nproc` ranks under torchrun (OUT/rank{r}.json, run_dir's metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), CKPT_RUN, str(out), CONFIG, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(job: subprocess.Popen, timeout: float) -> int:
    """The job's exit code; past `timeout` every process of it is killed and the test fails."""
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        from codistill_ds.distributed.launching import signal_tree

        signal_tree(job, signal.SIGKILL)
        raise


def log_tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")

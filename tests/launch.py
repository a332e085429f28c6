"""Start real ranks for a test: torchrun on loopback with gloo, results back through files.

Each worker script is an importable module with a `main()` (accelerate's test-script style);
torchrun gives it RANK/WORLD_SIZE, it writes `OUT/rank{r}.json`, and the test asserts on those
numbers. A timeout turns a hang into a failure instead of a stalled CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def torchrun(nproc: int, argv: list[str], timeout: float = 240, cwd: Path | None = None,
             **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc argv...`; argv is a script path or `-m module ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *argv]
    return subprocess.run(cmd, check=False, cwd=cwd or REPO, env=child_env(**env), capture_output=True,
                          text=True, timeout=timeout)


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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""codistill_ds.distributed.launching: the shared launcher of tests and benchmarks leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

from codistill_ds.distributed.launching import (
    REPO,
    LaunchFailed,
    child_env,
    free_port,
    run_captured,
    run_logged,
    torchrun_argv,
)

# A parent that starts a child and both sleep: the child's pid goes to stdout first (8 s
# timeouts leave room for two interpreter start-ups on a loaded machine).
TREE = [sys.executable, "-c",
        ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is gone for our purpose
        return fh.read().split()[2] != "Z"


def _gone_within(pid: int, seconds: float = 10) -> bool:
    """The group got SIGTERM together; a grandchild may take a moment longer to exit."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_timeout_stops_the_whole_process_group(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_captured(TREE, timeout_s=8)
    assert _gone_within(int(info.value.output.split()[0])), "a child outlived the timeout"
    log = tmp_path / "tree.log"
    with pytest.raises(LaunchFailed, match="timed out after 8 s"):
        run_logged(TREE, log, 8, "tree")
    assert _gone_within(int(log.read_text().splitlines()[1]))


def test_exit_code_tail_env_and_argv(tmp_path: Path) -> None:
    log = tmp_path / "fail.log"
    with pytest.raises(LaunchFailed, match=r"(?s)exit code 3.*boom"):
        run_logged([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log, 30, "fail")
    out = run_captured([sys.executable, "-c", "import os; print(os.environ['DS_ACCELERATOR'])"],
                       30, env=child_env(DS_ACCELERATOR="cuda"))
    assert out.stdout.strip() == "cuda" and out.returncode == 0
    os.environ["DS_ACCELERATOR"], saved = "cuda", os.environ.get("DS_ACCELERATOR")
    try:
        assert child_env()["DS_ACCELERATOR"] == "cpu"  # tests: CPU ranks whatever the caller has
        assert child_env(force_cpu=False)["DS_ACCELERATOR"] == "cuda"  # benchmarks keep it
    finally:
        if saved is None:
            del os.environ["DS_ACCELERATOR"]
        else:
            os.environ["DS_ACCELERATOR"] = saved
    assert child_env()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    argv = torchrun_argv(2, ["-m", "x"])
    assert argv[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert argv[5:7] == ["--master_addr", "127.0.0.1"] and 0 < int(argv[8]) < 65536
    assert 0 < free_port() < 65536

"""Launches that start when the session does and run niced while the rest of the suite runs.

The suite is CPU-bound on a small machine, yet a quarter of its core-seconds sit idle: tests
waiting out a timeout, a heartbeat or a killed rank's restart. A long launch that is checked
only for its output (not for how fast it ran, and not against a timeout a slow rank could
hit) runs at nice 19 from the start: it takes the cores whenever the foreground leaves them
idle and yields them otherwise, and the test that checks it runs last and only waits for it.

A module opts in with `pytestmark = pytest.mark.background` and a function
`background_launch(tmp: Path) -> tuple[list[str], dict[str, str]]` (the command and its extra
environment); its tests read the launch's result through the `background_run` fixture
(tests/conftest.py). The launch must tolerate starvation: no wall-clock limit of its own short
of the test's, and exchange timeouts long enough that no round is dropped.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from codistill_ds.distributed.launching import REPO, child_env, process_tree, stop


class BackgroundLaunch:
    """One niced process group; its output goes to files (a pipe nobody reads would fill)."""

    def __init__(self, cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.tmp = cmd, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / "stdout.log", "w") as out, open(tmp / "stderr.log", "w") as err:
            self.proc = subprocess.Popen(["nice", "-n", "19", *cmd], cwd=REPO, env=child_env(**(env or {})), stdout=out,
                                         stderr=err, start_new_session=True)  # nice execs: same pid

    def result(self, timeout_s: float) -> subprocess.CompletedProcess:
        """Wait for it (at full priority from now: the test that needs it is running); past
        timeout_s stop the whole group and raise subprocess.TimeoutExpired."""
        renice(self.proc.pid, 0)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop([self.proc])
            raise
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, (self.tmp / "stdout.log").read_text(),
                                           (self.tmp / "stderr.log").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop([self.proc])


def renice(pid: int, niceness: int) -> None:
    """Every thread of every process of the launch back to `niceness` (a thread's niceness is
    its own on Linux; raising priority needs root, which the test machines have: elsewhere the
    launch just finishes niced)."""
    for proc in process_tree(pid):
        try:
            tids = [int(t.name) for t in Path(f"/proc/{proc}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            except OSError:
                pass

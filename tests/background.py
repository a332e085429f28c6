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
import threading
import time
from pathlib import Path

from codistill_ds.distributed.launching import (
    REPO,
    child_env,
    child_processes,
    process_tree,
    stop,
)

POLL_S = 0.25
"""How often the running launches are searched for new sessions to nice: a rank runs at full
priority until then, and a walk of /proc costs milliseconds of the pytest process."""


class BackgroundLaunch:
    """One niced process group; its output goes to files (a pipe nobody reads would fill)."""

    def __init__(self, cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.tmp = cmd, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / "stdout.log", "w") as out, open(tmp / "stderr.log", "w") as err:
            self.proc = subprocess.Popen(["nice", "-n", "19", *cmd], cwd=REPO, env=child_env(**(env or {})), stdout=out,
                                         stderr=err, start_new_session=True)  # nice execs: same pid
        self.waiting = threading.Event()
        DEMOTER.add(self)

    def result(self, timeout_s: float) -> subprocess.CompletedProcess:
        """Wait for it (at full priority from now: the test that needs it is running); past
        timeout_s stop the whole group and raise subprocess.TimeoutExpired."""
        self.waiting.set()
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


class _Demoter:
    """Keeps every session of every running launch at autogroup nice 19, from one thread (one
    walk of /proc per poll, whatever the number of launches). With autogroups (Linux's default)
    the scheduler first shares the CPU equally between sessions, whatever the processes' own
    niceness, and a launch's ranks each start a session of their own (torchrun), so each
    session's group is niced as it appears."""

    def __init__(self) -> None:
        self.launches: list[BackgroundLaunch] = []
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, launch: BackgroundLaunch) -> None:
        with self.lock:
            self.launches.append(launch)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="background-demote", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        own, done = _autogroup("self"), set()
        while True:
            with self.lock:
                self.launches = [x for x in self.launches if x.proc.poll() is None and not x.waiting.is_set()]
                if not self.launches:
                    self.thread = None
                    return
                roots = [x.proc.pid for x in self.launches]
            children = child_processes()
            for pid in (p for root in roots for p in process_tree(root, children)):
                group = _autogroup(str(pid))
                if group and group != own and group not in done and _set_autogroup(pid, 19):
                    done.add(group)
            time.sleep(POLL_S)


DEMOTER = _Demoter()


def _autogroup(pid: str) -> str | None:
    """The autogroup's name (/autogroup-N), None where the kernel has none."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except (OSError, IndexError):
        return None


def _set_autogroup(pid: int, niceness: int) -> bool:
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(niceness))
        return True
    except OSError:
        return False


def renice(pid: int, niceness: int) -> None:
    """Every thread of every process of the launch back to `niceness` (a thread's niceness is
    its own on Linux; raising priority needs root, which the test machines have: elsewhere the
    launch just finishes niced)."""
    own = _autogroup("self")
    for proc in process_tree(pid):
        if _autogroup(str(proc)) not in (None, own):
            _set_autogroup(proc, niceness)
        try:
            tids = [int(t.name) for t in Path(f"/proc/{proc}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            except OSError:
                pass

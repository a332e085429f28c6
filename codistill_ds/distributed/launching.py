"""Start real ranks on this machine for tests and benchmarks, and always take them down.

One place for what every launch here needs (tests/launch.py and the benchmarks use it; training
never does): a free loopback port, the child environment (CPU DeepSpeed unless asked otherwise,
one thread per rank, offline hubs, this checkout importable), the `torchrun` command line, and
process-group shutdown (SIGTERM, then SIGKILL) so a timeout or Ctrl-C leaves no orphan ranks:
a launcher started with `start_new_session=True` is the leader of its own process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout root: children get it on PYTHONPATH and run from it."""


class LaunchFailed(RuntimeError):
    """A launched job exited non-zero or ran past its time limit; the message has its tail."""


def child_env(force_cpu: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment for a launched job, plus `extra`.

    force_cpu: DS_ACCELERATOR=cpu whatever the caller has (tests: CPU ranks over gloo); False
    keeps a DS_ACCELERATOR the caller set (benchmarks on a GPU machine). One OpenMP thread per
    rank: several ranks share the cores here."""
    env = dict(os.environ)
    if force_cpu or not env.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = "cpu"
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def torchrun_argv(nproc: int, argv: Sequence[str], rendezvous: Sequence[str] | None = None) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node nproc RENDEZVOUS argv...`; the default
    rendezvous is a single node on loopback at a free port."""
    if rendezvous is None:
        rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            *rendezvous, *argv]


def tail(path: Path, n: int = 4000) -> str:
    """The last n characters of a log file ('' if it does not exist)."""
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def process_tree(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """`pid` and all its descendants (from /proc, or from a `child_processes()` map already
    read). torchrun starts each rank in a session of its own, so a process-group signal to the
    launcher misses the ranks; walking the tree does not."""
    children = child_processes() if children is None else children
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def child_processes() -> dict[int, list[int]]:
    """{parent pid: its children's pids} of every process on the host, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to a launched job's every process (launcher, ranks, their helpers)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(procs: Sequence[subprocess.Popen], grace_s: float = 20.0) -> None:
    """End the launched jobs (launcher and ranks): SIGTERM, then SIGKILL after grace_s.

    torchrun forwards SIGTERM to its ranks; the KILL is for a rank stuck in a collective, and
    goes to every process of the tree (ranks live in sessions of their own)."""
    for p in procs:
        if p.poll() is None:
            signal_tree(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_tree(p, signal.SIGKILL)
            p.wait()


def wait_or_stop(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit code, or None after stopping the job at timeout_s; an interrupt (Ctrl-C, or a
    SIGTERM the caller turned into an exception) stops the job and propagates."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop([proc])
        return None
    except BaseException:
        stop([proc])
        raise


def run_logged(cmd: Sequence[str], log: Path, timeout_s: float, name: str,
               env: dict[str, str] | None = None) -> float:
    """Run cmd from the checkout root, stdout and stderr into `log`; wall seconds on success,
    LaunchFailed (with the log's tail) on a non-zero exit or past timeout_s."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        rc = wait_or_stop(proc, timeout_s)
    if rc is None:
        raise LaunchFailed(f"{name}: timed out after {timeout_s:.0f} s; log tail:\n{tail(log)}")
    if rc != 0:
        raise LaunchFailed(f"{name}: exit code {rc}; log tail:\n{tail(log)}")
    return time.perf_counter() - start


def run_captured(cmd: Sequence[str], timeout_s: float, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run cmd with stdout/stderr captured; past timeout_s the whole process group is stopped
    and subprocess.TimeoutExpired raised (as subprocess.run does, without orphaned ranks)."""
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop([proc])
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout_s, out, err) from None
    except BaseException:
        stop([proc])
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def command_line(module: str) -> str:
    """How a `python -m module ...` benchmark was started, for its results file."""
    return " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]])


def free_port() -> int:
    """A TCP port free on this host now (torch-free: launchers call it before any rank starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

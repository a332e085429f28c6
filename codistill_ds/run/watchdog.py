"""No rank may hang silently: heartbeats, a deadline per step, and one line naming who failed.

A codistillation job is K loosely coupled replicas, so the failures that matter are partial.
**A rank dies** (OOM kill, node loss): its peers see a broken connection in their next
collective, or nothing at all (a blocked receive, a shared-memory spin). Each rank runs a
`Watchdog`: a heartbeat file under RUN_DIR/health every second, and a deadline per step
(`backend.peer_timeout_s`; startup, checkpoint save and load get `backend.timeout_s`). On a
collective error or a missed deadline the rank reads its peers' heartbeats, names the rank that
is gone (exited process, or no heartbeat for `STALE_S`), prints ONE line and exits with
`EXIT_PEER_LOST`, leaving the last complete checkpoint untouched (torchrun `--max-restarts` then
restarts the job, which resumes from it).

The other guards: a diverged group stops before its next exchange (`guards.py`); peers'
non-finite predictions are dropped per round (the exchange engine); ranks that disagree on the
vocabulary, the model or the data are stopped at start (`handshake.py`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.run.guards import NonFiniteLoss

EXIT_PEER_LOST = 3
"""Exit status of a rank that stopped because a peer rank or group failed."""
EXIT_NONFINITE = 4
"""Exit status of the ranks of a group whose training loss stopped being finite."""
HEARTBEAT_S = 1.0
"""Seconds between heartbeat files."""
STALE_S = 5.0
"""A peer whose heartbeat is this old is reported as not answering."""
BEAT_EVERY_STEP_S = 0.2
"""Completed steps also write the heartbeat, at most this often, so peers quote a recent step."""
HEALTH_DIR = "health"
CAUSE, REACTION = "cause", "reaction"
"""Failure-note kinds: why a rank stopped by itself, or that it stopped because a peer did."""

_COMM_ERROR_MARKERS = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl",
                       "timed out", "timeout", "processgroup", "socket", "peer")


def _heartbeat_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, HEALTH_DIR, f"rank_{rank}.json")


def _note_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, HEALTH_DIR, f"failure_rank_{rank}.txt")


def _write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _process_gone(pid: int) -> bool:
    """True when `pid` (on this host) exited; a zombie awaiting its parent counts as exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


def is_comm_error(err: BaseException) -> bool:
    """Errors a collective raises when a peer is gone (gloo/NCCL connection loss, timeouts)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, (RuntimeError, ConnectionError, OSError, TimeoutError)) and any(
        m in text for m in _COMM_ERROR_MARKERS)


def _short(err: BaseException) -> str:
    """`RuntimeError: Connection closed by peer [127.0.0.1]:41234` without gloo's source path."""
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", str(err)).strip()
    text = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {text.split('. ')[0][:160]}"


def stop_process(message: str, code: int) -> None:
    """Print the one line and leave at once: a clean interpreter exit would join the exchange
    thread or destroy process groups, either of which can block on a dead peer."""
    print(f"codistill-ds: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


class Watchdog:
    """Heartbeats for my peers to read, and a deadline per step that turns a hang into an exit."""

    def __init__(self, run_dir: str, dims: ParallelDims, peer_timeout_s: float, slow_timeout_s: float,
                 latest_checkpoint=None) -> None:
        self.run_dir, self.dims = run_dir, dims
        self.peer_timeout_s, self.slow_timeout_s = peer_timeout_s, slow_timeout_s
        self._latest = latest_checkpoint or (lambda: None)
        self.step = 0
        """Last step this rank completed."""
        self.phase = "startup"
        self._deadline = time.monotonic() + slow_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codistill-watchdog", daemon=True)
        self._host = socket.gethostname()
        self._last_beat = 0.0

    # ---- the main thread's side ------------------------------------------------------
    def start(self) -> Watchdog:
        os.makedirs(os.path.join(self.run_dir, HEALTH_DIR), exist_ok=True)
        note = _note_path(self.run_dir, self.dims.rank)
        if os.path.exists(note):  # left by an earlier attempt of this rank
            os.remove(note)
        self._beat()
        self._thread.start()
        self._arm(self.slow_timeout_s)
        return self

    def resumed(self, step: int) -> None:
        """Training starts after `step`; the first step keeps the slow deadline (ZeRO-3 traces
        its first forward with world-wide broadcasts, compilers warm up)."""
        self.step, self.phase = step, f"step {step + 1}"
        self._deadline = time.monotonic() + self.slow_timeout_s
        self._arm(self.slow_timeout_s)

    def completed(self, step: int) -> None:
        """Step `step` finished on this rank: the next one gets `peer_timeout_s`."""
        self.step, self.phase = step, f"step {step + 1}"
        self._deadline = time.monotonic() + self.peer_timeout_s
        self._arm(self.peer_timeout_s)
        if time.monotonic() - self._last_beat > BEAT_EVERY_STEP_S:  # peers quote my last step
            self._beat()

    @contextmanager
    def slow(self, phase: str) -> Iterator[None]:
        """A phase allowed `slow_timeout_s` (checkpoint save/load, the end-of-run gather)."""
        previous = self.phase
        self.phase = phase
        self._deadline = time.monotonic() + self.slow_timeout_s
        self._arm(self.slow_timeout_s)
        self._beat()
        yield
        self.phase = previous
        self._deadline = time.monotonic() + self.peer_timeout_s
        self._arm(self.peer_timeout_s)

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def fail(self, err: BaseException) -> None:
        """Exit with the peer-failure message if `err` comes from a lost peer; else return."""
        if not is_comm_error(err) and not self.lost_peers(wait_s=0.0):
            return
        self.stop()
        self._note(REACTION, "stopped after losing a peer")
        stop_process(self.message(f"a collective failed ({_short(err)})"), EXIT_PEER_LOST)

    def stop_group(self, err: NonFiniteLoss) -> None:
        """My group diverged: leave a note for the peers, then exit."""
        self.stop()
        self._note(CAUSE, f"group {self.dims.group_id} stopped: {err}")
        stop_process(f"rank {self.dims.rank} (group {self.dims.group_id}): {err}; "
                     f"{self._checkpoint_hint()}", EXIT_NONFINITE)

    # ---- diagnosis ------------------------------------------------------------------------
    def lost_peers(self, wait_s: float = STALE_S + HEARTBEAT_S) -> list[tuple[str, str]]:
        """(kind, description) of the ranks that are gone; waits up to `wait_s` for a cause to
        show (a peer killed a moment ago still has a recent heartbeat)."""
        until = time.monotonic() + wait_s
        while True:
            lost = [d for r in range(self.dims.world_size) if r != self.dims.rank
                    for d in [self._diagnose(r)] if d]
            if any(kind == CAUSE for kind, _ in lost):
                return lost
            if time.monotonic() >= until:
                return lost
            time.sleep(0.2)

    def _note(self, kind: str, text: str) -> None:
        """Tell the peers why I stop, before diagnosing: ranks that stop in reaction to the same
        failure then tell each other apart from its cause."""
        try:
            _write_json(_note_path(self.run_dir, self.dims.rank), {"kind": kind, "text": text})
        except OSError:
            pass

    def _diagnose(self, rank: int) -> tuple[str, str] | None:
        """(CAUSE or REACTION, description) for a rank that is gone; None if it is alive."""
        who = f"rank {rank} (group {self.dims.group_of(rank)})"
        try:
            with open(_note_path(self.run_dir, rank)) as f:
                note = json.load(f)
            return note["kind"], f"{who} reported: {note['text']}"
        except (OSError, ValueError, KeyError):
            pass
        try:
            with open(_heartbeat_path(self.run_dir, rank)) as f:
                beat = json.load(f)
        except (OSError, ValueError):
            return CAUSE, f"{who} never wrote a heartbeat"
        if beat.get("host") == self._host and _process_gone(int(beat["pid"])):
            return CAUSE, f"{who} exited (process {beat['pid']} is gone; its last completed step: {beat['step']})"
        age = time.time() - float(beat["time"])
        if age > STALE_S:
            return CAUSE, (f"{who} stopped answering (no heartbeat for {age:.0f}s; its last "
                           f"completed step: {beat['step']})")
        return None

    def message(self, what: str) -> str:
        lost = self.lost_peers()
        causes = [text for kind, text in lost if kind == CAUSE]
        echoes = [text.split(" reported")[0] for kind, text in lost if kind == REACTION]
        who = "; ".join(causes) if causes else (
            "could not tell which peer failed first (no exited process or stale heartbeat under "
            f"{os.path.join(self.run_dir, HEALTH_DIR)})")
        if echoes:
            who += f" ({', '.join(echoes)} stopped in reaction)"
        return (f"rank {self.dims.rank} (group {self.dims.group_id}) stopping in {self.phase}: "
                f"{what}; {who}. Last completed step: {self.step}; {self._checkpoint_hint()}")

    def _checkpoint_hint(self) -> str:
        path = self._latest()
        if path is None:
            return "no complete checkpoint yet (set train.save_interval)"
        return (f"last complete checkpoint: {path} (continue with `codistill-ds train --resume`; "
                "automatic under torchrun --max-restarts)")

    # ---- the watchdog thread --------------------------------------------------------------
    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        try:
            _write_json(_heartbeat_path(self.run_dir, self.dims.rank), {
                "rank": self.dims.rank, "group": self.dims.group_id, "step": self.step,
                "time": time.time(), "pid": os.getpid(), "host": self._host})
        except OSError:
            pass  # a full or flaky disk must not kill training; peers then see a stale beat

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()
            if time.monotonic() > self._deadline and not self._stop.is_set():
                limit = self.peer_timeout_s if self.phase.startswith("step") else self.slow_timeout_s
                self._note(REACTION, "stopped waiting for a peer")
                stop_process(self.message(f"no progress for {limit:.0f}s"), EXIT_PEER_LOST)

    def _arm(self, seconds: float) -> None:
        # Backstop for a collective that spins while holding the GIL (this thread then never
        # runs): faulthandler's C thread dumps every stack and exits.
        faulthandler.dump_traceback_later(seconds + 2 * STALE_S + 30, exit=True)

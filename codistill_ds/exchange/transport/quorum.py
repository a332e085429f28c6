"""A Lighthouse quorum asked for one round ahead.

Why ahead: a quorum RPC costs a round trip to the Lighthouse plus a wake-up of every thread on
the way (a millisecond idle, tens of milliseconds on a loaded machine), and until now every
exchange round paid it on the training thread before its collective. The Lighthouse holds one
pending request per member and answers it once every member of the previous quorum has asked
again (its "fast quorum"), so a member can ask for round r + 1's quorum as soon as round r's
collective is over: the groups ask together (the collective just synchronized them), the
quorum forms while they train, and at round r + 1 it is there. Asking *after* the collective
(not before) keeps the member data current: a round that failed raises the generation, and the
next quorum must carry it (`LighthouseMember` reconfigures on it). This holds for every
collective of every mode (the leaders' all-gather and all-to-all, the rails'): the leader asks
once its round, or every rail of its group, is over.

The answer is turned into a `Plan` on the same background thread (member data verified with
the shared secret, contract check, one job per group, retire marks: `membership.py`), so that
bookkeeping is overlapped with training as well.

Because the quorum is asked before the exchange index (and the group's reported loss) of the
next round is known to the member, those travel in each frame's signed header instead
(`frames.py`), exchange index -1 for "no predictions from me this round" (a job that is
leaving takes part in the collective it had already agreed to, without predictions).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Plan:
    """One quorum, read: who takes part in the round's collective, in replica-id order."""

    quorum_id: int
    members: list[Any]
    """Participants of the collective (me included when I am in it): compatible, one job per
    group, neither joining nor leaving."""
    me: int | None
    """My index in `members`; None when I am not in the collective."""
    generation: int = 0
    """The highest generation in the member data (a failed round raised it somewhere)."""
    retiring: set[int] = field(default_factory=set)
    """Groups that announced in this quorum that they leave for good."""
    failed: Exception | None = None
    """The request itself failed (no quorum within the timeout, Lighthouse down)."""

    @property
    def peers(self) -> int:
        """Peer groups of this round (0 when I am alone or not in it)."""
        return len(self.members) - 1 if self.me is not None and len(self.members) > 1 else 0


class QuorumAhead:
    """At most one quorum request in flight, asked on a background thread; `take` hands its
    plan to the round that uses it, `peek` lets the engine look before computing.

    Args:
        ask: makes one request and reads the answer (`LighthouseMember._ask`); exceptions
            other than `IncompatibleGroup` become a `Plan` with `failed` set.
        keep: exception types that must reach the round as they are (a refusal).
    """

    def __init__(self, ask: Callable[[], Plan], keep: tuple[type[Exception], ...] = ()) -> None:
        self._ask, self._keep = ask, keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-quorum-ahead")
        self._future: Future | None = None
        self._lock = threading.Lock()

    def _run(self) -> Plan:
        try:
            return self._ask()
        except self._keep:
            raise
        except Exception as err:  # noqa: BLE001 -- a failed request is a round without peers
            return Plan(-1, [], None, failed=err)

    def request(self) -> None:
        """Ask for the next quorum now, unless a request is already in flight or unused."""
        with self._lock:
            if self._future is None:
                self._future = self._pool.submit(self._run)

    def in_flight(self) -> bool:
        return self._future is not None

    def peek(self, block: bool, timeout: float | None = None) -> Plan | None:
        """The next plan without using it: None when not asked yet, or (not blocking) not there."""
        future = self._future
        if future is None or (not block and not future.done()):
            return None
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            return None

    def take(self, block: bool, timeout: float | None = None) -> Plan | None:
        """The next plan, used up (the next `request` asks again); asks now if nothing is in
        flight. None when not blocking and it is not there yet."""
        self.request()
        plan = self.peek(block, timeout)
        if plan is not None:
            with self._lock:
                self._future = None
        return plan

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

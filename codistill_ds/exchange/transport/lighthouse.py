"""One group's membership of the torchft Lighthouse: heartbeats, quorums, one collective per round.

The group's leader holds a `LighthouseMember`; each exchange round takes a quorum of the groups
alive now (asked for one round ahead, on a background thread: `quorum.QuorumAhead`), turns it
into the round's `view`, configures torchft's reconfigurable gloo process group over it (only
when membership changed, `quorum_pg.QuorumGroup`) and runs one collective: an all-gather of
whole-batch payloads (`round`), or an all-to-all whose part for group h is what h alone trains
on (`round_to_owners`, `exchange_batch: train`). On route `rails` the leader only asks; its
ranks run the collective on their rails over the view it broadcasts (`rails.py`), and the next
quorum is asked once every rail is done (`done`). The member data carries the exchange contract
(`contract.py`), who takes part and the groups known to have retired; each frame of the
collective carries its exchange index, byte count and the loss the group reports of itself
(`frames.py`), so the payload is the predictions (or weights) only. With a shared secret the
member data and every frame of every collective carry HMAC tags (`trust.py`); members that do
not verify are left out before any process group is configured.

A job that leaves for good says so (`close(retire=True)`): it takes part in the round it had
already agreed to without predictions, then asks once more with a retire mark. The running
groups leave it out of that round on, remember it in their member data (so a group that
(re)starts later does not wait for it at its join), and do not block on the next quorum, which
the Lighthouse holds until the retired job's heartbeat times out: rounds go without peers
meanwhile.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from urllib.parse import urlparse

import torch

from codistill_ds.config import ConfigError
from codistill_ds.exchange.transport import trust
from codistill_ds.exchange.transport.contract import IncompatibleGroup
from codistill_ds.exchange.transport.frames import NO_PREDICTIONS
from codistill_ds.exchange.transport.membership import compatible, learn_retired
from codistill_ds.exchange.transport.quorum import Plan, QuorumAhead
from codistill_ds.exchange.transport.quorum_pg import (
    AllGather,
    AllToAll,
    Collective,
    PeerPayload,
    QuorumGroup,
    RoundView,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1
"""Seconds between heartbeats to the Lighthouse (its heartbeat timeout decides when a silent
group is dropped from quorums)."""
UNREACHABLE_S = 1.5
"""No heartbeat has reached the Lighthouse for this long: the link is down, skip rounds."""
FAREWELL_S = 5.0
"""The longest a leaving job waits for its last two quorums (the round it agreed to, the mark)."""


def _route_to(url: str) -> tuple[str, str | None]:
    """(my address as the Lighthouse host sees it, the name of its network interface).

    The leader's store and gloo sockets must be reachable by the other groups' leaders; the
    address that routes to the Lighthouse is the one that does. Gloo picks its interface from
    the hostname unless GLOO_SOCKET_IFNAME names one, which on some machines (this one) is an
    address nobody else can reach."""
    host = urlparse(url).hostname or "127.0.0.1"
    port = urlparse(url).port or 29510
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), port))
        addr = s.getsockname()[0]
    return addr, _interface_of(addr)


def _interface_of(addr: str) -> str | None:
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            if socket.inet_ntoa(packed[20:24]) == addr:
                return name
        except OSError:
            continue
    return None


class LighthouseMember:
    """A group leader's membership: heartbeats, one quorum per round (asked one round ahead),
    the reconfigurable gloo process group over the compatible members, and the route `leaders`
    collective on it."""

    def __init__(self, lighthouse: str, group_id: int, contract: dict, timeout_s: float,
                 connect_timeout_s: float = 10.0, key: bytes | None = None) -> None:
        from torchft._torchft import LighthouseClient

        self.url, self.group_id, self.contract = lighthouse, group_id, contract
        self.key = key
        """The shared secret (trust.py), or None: no authentication."""
        self.nonce, self.started = uuid.uuid4().hex, time.time()
        self.replica_id = f"group_{group_id}_{self.nonce[:12]}"
        """Unique per job, so two jobs claiming one group id are both visible in a quorum (the
        Lighthouse keys members by replica id) and the younger is refused deterministically."""
        self.timeout = datetime.timedelta(seconds=timeout_s)
        host, iface = _route_to(lighthouse)
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        try:
            self.client = LighthouseClient(lighthouse, datetime.timedelta(seconds=connect_timeout_s))
            self.client.heartbeat(self.replica_id, datetime.timedelta(seconds=connect_timeout_s))
        except Exception as err:  # noqa: BLE001 -- the Rust client raises plain RuntimeError/TimeoutError
            raise ConfigError("codistill.lighthouse", f"cannot reach the Lighthouse at {lighthouse} "
                              f"within {connect_timeout_s:.0f}s ({type(err).__name__}: {err}); start it "
                              "with `codistill-ds lighthouse --port PORT`") from None
        self.store = torch.distributed.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                                timeout=self.timeout)
        self.store_address = f"{host}:{self.store.port}"
        self.pg = QuorumGroup(timeout_s, "leaders", key)
        self.generation = 0
        """Raised after a failed round; the next round's members take the highest generation
        they see and reconfigure, so a broken process group is never reused."""
        self._last_beat = time.monotonic()
        """When a heartbeat last reached the Lighthouse: while it cannot be reached, rounds are
        skipped at once instead of each waiting out a quorum timeout (training goes on alone)."""
        self.last_heartbeat_error: Exception | None = None
        self.last_quorum_error: Exception | None = None
        """The latest failures of the background heartbeat and of the start-up join (for a report)."""
        self.retired: dict[int, str] = {}
        """Group id -> nonce of a job that announced it left for good (learned in quorums and
        passed on in my member data), so that a join does not wait for that group."""
        self.missing: set[int] = set()
        """Groups the start-up join waited for in vain (neither present nor retired)."""
        self._retiring = False
        self._refused = False
        self._block = True
        """Whether a round waits for its quorum: not right after a job retired (the Lighthouse
        holds that quorum until the retired job's heartbeat times out)."""
        self._ahead = QuorumAhead(self._ask, keep=(IncompatibleGroup,))
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._beat = threading.Thread(target=self._heartbeat, name="codistill-lighthouse-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.client.heartbeat(self.replica_id, datetime.timedelta(seconds=1))
                self._last_beat = time.monotonic()
            except Exception as err:  # noqa: BLE001 -- a lost link: rounds are skipped until a beat gets through
                self.last_heartbeat_error = err

    def reachable(self) -> bool:
        """A heartbeat got through within the last UNREACHABLE_S seconds."""
        return time.monotonic() - self._last_beat < UNREACHABLE_S

    # ---- leaving ------------------------------------------------------------------------------
    def close(self, retire: bool = True) -> None:
        """Leave the Lighthouse; `retire`: say that this group leaves for good (a farewell of at
        most two quorums, FAREWELL_S each), so the running groups neither exchange with it nor
        wait for it at a later join. A refused job or an unreachable Lighthouse skips it. On
        route `rails` the rails take part in the agreed round (`rails.FTRails.close`) and call
        this with retire=False after `retire_mark`."""
        if retire:
            view = self.farewell_view()
            if view is not None:
                try:  # the others count on me in this round's collective: take part, send nothing
                    self.pg.run(view, self.group_id, self._nothing(), NO_PREDICTIONS)
                except Exception as err:  # noqa: BLE001 -- leaving anyway
                    self._warn("farewell", f"the last round failed ({type(err).__name__}: {err})")
            self.retire_mark()
        self._stop.set()
        # No heartbeat call may still be inside the Lighthouse client when the process ends: a
        # library thread alive at interpreter finalization can abort a run that succeeded (the
        # CLI skips finalization, env.exit_process; a user's own loop does not).
        self._beat.join(timeout=HEARTBEAT_S + 2.0)
        self._ahead.close()
        self.pg.close()

    def _nothing(self) -> Collective:
        """The collective of my mode with nothing from me (the contract says which)."""
        return AllToAll({}) if self.contract.get("exchange_batch") == "train" else AllGather(None)

    def can_retire(self) -> bool:
        return not self._refused and not self._retiring and self.reachable()

    def farewell_view(self) -> RoundView | None:
        """The view of the round I had already agreed to (its quorum asked ahead), if peers
        count on me in it; None otherwise (or when I may not retire)."""
        if not self.can_retire() or not self._ahead.in_flight():
            return None
        try:
            plan = self._ahead.take(block=True, timeout=FAREWELL_S)
        except IncompatibleGroup:
            return None
        return self._view_of(plan) if plan is not None and plan.failed is None and plan.peers else None

    def retire_mark(self) -> None:
        """Ask once more, with a retire mark in my member data."""
        if not self.can_retire():
            return
        self._retiring = True
        try:
            self.client.quorum(replica_id=self.replica_id, timeout=datetime.timedelta(seconds=FAREWELL_S),
                               address="", store_address=self.store_address, step=0, world_size=1,
                               shrink_only=False, data=trust.seal(self._data(-1, joining=False), self.key))
        except Exception as err:  # noqa: BLE001 -- leaving anyway: the others see a silent job
            self._warn("farewell", f"could not announce the retirement ({type(err).__name__}: {err})")

    # ---- quorums ------------------------------------------------------------------------------
    def _data(self, e: int, joining: bool) -> dict:
        return {"group": self.group_id, "exchange": e, "contract": self.contract, "nonce": self.nonce,
                "started": self.started, "gen": self.generation, "joining": joining, "replica": self.replica_id,
                "retiring": self._retiring, "retired": {str(g): n for g, n in self.retired.items()}}

    def _quorum(self, e: int, joining: bool):
        return self.client.quorum(replica_id=self.replica_id, timeout=self.timeout, address="",
                                  store_address=self.store_address, step=max(e, 0), world_size=1,
                                  shrink_only=False, data=trust.seal(self._data(e, joining), self.key))

    def _members(self, quorum, seen: dict[str, trust.Member] | None = None) -> list[trust.Member]:
        """The quorum's participants this round may exchange with (`membership.compatible`)."""
        return compatible(quorum, key=self.key, contract=self.contract, group_id=self.group_id, nonce=self.nonce,
                          warn=self._warn, seen=seen)

    def _ask(self) -> Plan:
        """On the quorum thread: one request for the next round, and its answer read (member
        data verified, the contract, one job per group, the retire marks), all off the training
        thread."""
        quorum = self._quorum(-1, joining=False)
        try:
            members = self._members(quorum)
        except IncompatibleGroup:
            self._refused = True
            raise
        learn_retired(self.retired, members)
        retiring = {int(m.data["group"]) for m in members if m.data.get("retiring")}
        active = [m for m in members if not m.data.get("joining") and not m.data.get("retiring")]
        ids = [m.replica_id for m in active]
        me = ids.index(self.replica_id) if self.replica_id in ids else None
        gen = max((int(m.data.get("gen", 0)) for m in active), default=0)
        return Plan(int(quorum.quorum_id), active, me, gen, retiring)

    def join(self, groups: int, wait_s: float) -> int:
        """Block until groups 0..groups-1 are present or known to have retired (or `wait_s`
        passed); returns how many groups are present. Then asks for the first round's quorum."""
        deadline = time.monotonic() + wait_s
        present: set[int] = set()
        seen: dict[str, trust.Member] = {}
        while True:
            try:
                members = self._members(self._quorum(-1, joining=True), seen)
                learn_retired(self.retired, members)
                present = {int(m.data["group"]) for m in members if not m.data.get("retiring")}
            except IncompatibleGroup:
                self._refused = True
                raise
            except Exception as err:  # noqa: BLE001 -- no quorum within the timeout: ask again until the deadline
                self.last_quorum_error = err
            self.missing = set(range(groups)) - present - set(self.retired)
            if not self.missing or time.monotonic() >= deadline:
                self._ahead.request()
                return len(present)
            time.sleep(0.05)

    def peers_ahead(self, block: bool) -> int | None:
        """Peers of the next round if its quorum is there (waiting for it when `block`), None
        when not known yet. After a retirement, or while the Lighthouse is unreachable, rounds
        do not wait: 0 when it is not there."""
        reachable = self.reachable()
        self._ahead.request()
        try:
            plan = self._ahead.peek(block and self._block and reachable)
        except IncompatibleGroup:
            return None  # the round itself raises it, on every rank of my group (`view`)
        if plan is None:
            return None if self._block and reachable else 0
        if plan.failed is not None:
            return 0
        return plan.peers

    def skip_round(self) -> None:
        """A round in which I have nothing to send because `peers_ahead` said 0: use up that
        quorum (if it is there and still has no peer) and ask for the next one."""
        try:
            plan = self._ahead.peek(block=False)
        except IncompatibleGroup:
            return  # kept for the next round, which raises it on every rank of my group
        if plan is not None and (plan.peers == 0 or plan.failed is not None):
            self._ahead.take(block=False)
            self._block = not plan.retiring
            self._ahead.request()

    # ---- rounds -------------------------------------------------------------------------------
    def round(self, e: int, payload: torch.Tensor, report: dict | None = None) -> list[PeerPayload]:
        """One exchange round: my whole-batch payload (and `report`, what my group says of
        itself) to the compatible groups present, theirs back, each frame checked (tag, byte
        length) before anyone unpacks it: a refused one comes back with its `problem` set. A
        failed round (a peer died or stopped mid-way) returns [] and is not retried."""
        return self._round(e, AllGather(payload), report)

    def round_to_owners(self, e: int, parts: dict[int, torch.Tensor], report: dict | None = None) -> list[PeerPayload]:
        """One round where my part for group h goes to h alone (`quorum_pg.AllToAll`)."""
        return self._round(e, AllToAll(parts), report)

    def _round(self, e: int, collective: Collective, report: dict | None) -> list[PeerPayload]:
        view = self.view(e)
        if view is None:
            return []
        try:
            return self.pg.run(view, self.group_id, collective, e, report)
        except Exception as err:  # noqa: BLE001 -- gloo reports a lost peer as RuntimeError
            self.failed(e, view, err)
            return []
        finally:
            self.done()

    def view(self, e: int) -> RoundView | None:
        """Who takes part in exchange round e (the quorum asked ahead, waited for unless a group
        just retired): the compatible groups that are neither joining nor leaving, or None (no
        quorum in time, the Lighthouse unreachable, or nobody else here; the next quorum is then
        asked at once). Raises `IncompatibleGroup` when this job is refused. After a view, the
        caller runs the round's collective(s), then `done`.

        While no heartbeat gets through, a quorum that is not there yet is not waited for (its
        request fails on the quorum thread after the timeout): rounds are skipped at once and
        training goes on alone, as before quorums were asked ahead."""
        reachable = self.reachable()
        plan = self._ahead.take(block=self._block and reachable)
        if plan is None:  # not there yet, and not waited for (a group just retired, or no link)
            if not reachable:
                self._warn("unreachable", f"the Lighthouse at {self.url} is unreachable; training on without "
                           "peers until it answers again (warned once)")
            return None
        self._block = not plan.retiring
        if plan.failed is not None:
            err = plan.failed
            self._warn(f"quorum{type(err).__name__}", f"no quorum for exchange {e} ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120] if str(err) else ''}); training on without peers "
                       "(warned once)")
        view = self._view_of(plan) if plan.failed is None and plan.peers else None
        if view is None:
            self.done()
        return view

    def _view_of(self, plan: Plan) -> RoundView:
        self.generation = max(self.generation, plan.generation)
        return RoundView(plan.quorum_id, self.generation, tuple(m.replica_id for m in plan.members),
                         tuple(int(m.data["group"]) for m in plan.members), plan.members[0].store_address)

    def done(self) -> None:
        """The round's collective is over (here, or on every rail of my group): ask for the next
        round's quorum now, so that it forms while we train; its member data carries the
        outcome (a failure's raised generation)."""
        if not self._stop.is_set():
            self._ahead.request()

    def failed(self, e: int, view: RoundView, err: Exception | str) -> None:
        """A round's collective failed (here, or on one of my group's rails): the next round's
        members take the highest generation they see and reconfigure, so a broken process group
        is never reused."""
        self.generation += 1
        text = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}" if isinstance(err, Exception) else err
        self._warn(f"round{e}", f"exchange {e} with groups {list(view.groups)} failed ({text}); training on")

    def _warn(self, key: str, text: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("group %d: %s", self.group_id, text)

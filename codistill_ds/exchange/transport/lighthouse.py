"""One group's membership of the torchft Lighthouse: heartbeats, quorums, one all-gather per round.

The group's leader holds a `LighthouseMember`; each exchange round takes a quorum of the groups
alive now (asked for one round ahead, on a background thread: `quorum.QuorumAhead`), configures
torchft's reconfigurable gloo process group over them (only when membership changed) and
all-gathers the whole-batch payloads. The member data carries the exchange contract
(`contract.py`), the job's identity and the groups known to have retired; each payload carries
its exchange index (`quorum.frame`), so the payload is the predictions only.

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
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from codistill_ds.config import ConfigError
from codistill_ds.exchange.transport.contract import (
    IncompatibleGroup,
    contract_mismatch,
    reference_contract,
)
from codistill_ds.exchange.transport.quorum import (
    NO_PREDICTIONS,
    Plan,
    QuorumAhead,
    frame,
    unframe,
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


@dataclass
class PeerPayload:
    """One peer group's whole-batch predictions from a round."""

    group: int
    exchange: int
    payload: torch.Tensor


class LighthouseMember:
    """A group leader's membership: heartbeats, one quorum per round, the reconfigurable gloo
    process group over the compatible members, and the all-gather of their payloads."""

    def __init__(self, lighthouse: str, group_id: int, contract: dict, timeout_s: float,
                 connect_timeout_s: float = 10.0) -> None:
        from torchft._torchft import LighthouseClient
        from torchft.process_group import ProcessGroupGloo

        self.url, self.group_id, self.contract = lighthouse, group_id, contract
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
        self.pg = ProcessGroupGloo(timeout=self.timeout)
        self.generation = 0
        """Raised after a failed round; the next round's members take the highest generation
        they see and reconfigure, so a broken process group is never reused."""
        self._pg_key: tuple | None = None
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
        self._payload_size: int | None = None
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

    def close(self, retire: bool = True) -> None:
        """Leave the Lighthouse; `retire`: say that this group leaves for good (a farewell of at
        most two quorums, FAREWELL_S each), so the running groups neither exchange with it nor
        wait for it at a later join. A refused job or an unreachable Lighthouse skips it."""
        if retire and not self._refused and self.reachable():
            try:
                self._farewell()
            except Exception as err:  # noqa: BLE001 -- leaving anyway: the others see a silent job
                self._warn("farewell", f"could not announce the retirement ({type(err).__name__}: {err})")
        self._stop.set()
        self._ahead.close()
        self.pg.abort(errored=False)

    def _farewell(self) -> None:
        plan = self._ahead.take(block=True, timeout=FAREWELL_S) if self._ahead.in_flight() else None
        if plan is not None and plan.peers and self._payload_size is not None:
            # The others count on me in this round's collective: take part, send nothing.
            self._collective(plan, torch.zeros(self._payload_size, dtype=torch.uint8), NO_PREDICTIONS)
        self._retiring = True
        self.client.quorum(replica_id=self.replica_id, timeout=datetime.timedelta(seconds=FAREWELL_S), address="",
                           store_address=self.store_address, step=0, world_size=1, shrink_only=False,
                           data=self._data(-1, joining=False))

    def _data(self, e: int, joining: bool) -> dict:
        return {"group": self.group_id, "exchange": e, "contract": self.contract, "nonce": self.nonce,
                "started": self.started, "gen": self.generation, "joining": joining,
                "retiring": self._retiring, "retired": {str(g): n for g, n in self.retired.items()}}

    def _quorum(self, e: int, joining: bool):
        return self.client.quorum(replica_id=self.replica_id, timeout=self.timeout, address="",
                                  store_address=self.store_address, step=max(e, 0), world_size=1,
                                  shrink_only=False, data=self._data(e, joining))

    def _ask(self) -> Plan:
        """On the quorum thread: one request for the next round, and its answer read (the
        contract, one job per group, the retire marks), all off the training thread."""
        quorum = self._quorum(-1, joining=False)
        try:
            members = self._members(quorum)
        except IncompatibleGroup:
            self._refused = True
            raise
        self._learn_retired(members)
        retiring = {int(m.data["group"]) for m in members if m.data.get("retiring")}
        active = [m for m in members if not m.data.get("joining") and not m.data.get("retiring")]
        ids = [m.replica_id for m in active]
        me = ids.index(self.replica_id) if self.replica_id in ids else None
        gen = max((int(m.data.get("gen", 0)) for m in active), default=0)
        return Plan(int(quorum.quorum_id), active, me, gen, retiring)

    def _learn_retired(self, members: list[Any]) -> None:
        """Retire marks seen in a quorum or passed on by its members; a group present again (a
        new job: another nonce) is no longer retired."""
        for m in members:
            for g, nonce in (m.data.get("retired") or {}).items():
                self.retired.setdefault(int(g), nonce)
            if m.data.get("retiring"):
                self.retired[int(m.data["group"])] = m.data["nonce"]
        for m in members:
            g = int(m.data["group"])
            if not m.data.get("retiring") and self.retired.get(g) not in (None, m.data["nonce"]):
                del self.retired[g]

    def _members(self, quorum) -> list[Any]:
        """The quorum's participants this round may exchange with, in replica-id order: those
        holding the contract most members share (a newcomer never displaces the running groups),
        then one job per group id, the oldest (a second job claiming a running group's id is
        refused). Raises `IncompatibleGroup` when the refusal is mine; everyone else computes the
        same list from the same member data and leaves the refused job out."""
        parts = list(quorum.participants)
        reference = reference_contract([dict(p.data) for p in parts])
        why = contract_mismatch(self.contract, reference)
        if why is not None:
            field, detail = why.split(": ", 1)
            raise IncompatibleGroup(field, f"refused by the running codistillation groups: {detail}")
        compatible = [p for p in parts if p.data["contract"] == reference]
        oldest: dict[int, Any] = {}
        for p in compatible:
            g, key = int(p.data["group"]), (p.data["started"], p.data["nonce"])
            if g not in oldest or key < (oldest[g].data["started"], oldest[g].data["nonce"]):
                oldest[g] = p
        if self.group_id in oldest and oldest[self.group_id].data["nonce"] != self.nonce:
            other = oldest[self.group_id].data
            raise IncompatibleGroup("codistill.group_id", f"group {self.group_id} is already trained by "
                                    f"another job (running since {time.ctime(other['started'])}); give "
                                    "each job its own group id")
        return [p for p in compatible if oldest[int(p.data["group"])] is p]

    def join(self, groups: int, wait_s: float) -> int:
        """Block until groups 0..groups-1 are present or known to have retired (or `wait_s`
        passed); returns how many groups are present. Then asks for the first round's quorum."""
        deadline = time.monotonic() + wait_s
        present: set[int] = set()
        while True:
            try:
                members = self._members(self._quorum(-1, joining=True))
                self._learn_retired(members)
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
        when not known yet. After a retirement rounds do not wait: 0 when it is not there."""
        if not self.reachable() and not self._ahead.in_flight():
            return 0
        self._ahead.request()
        plan = self._ahead.peek(block and self._block)
        if plan is None:
            return None if self._block else 0
        if plan.failed is not None:
            return 0
        return plan.peers

    def skip_round(self) -> None:
        """A round in which I have nothing to send because `peers_ahead` said 0: use up that
        quorum (if it is there and still has no peer) and ask for the next one."""
        plan = self._ahead.peek(block=False)
        if plan is not None and (plan.peers == 0 or plan.failed is not None):
            self._ahead.take(block=False)
            self._block = not plan.retiring
            self._ahead.request()

    def round(self, e: int, payload: torch.Tensor) -> list[PeerPayload]:
        """One exchange round: my whole-batch payload to the compatible groups present, theirs
        back. A failed round (a peer died or stopped mid-way) returns [] and is not retried."""
        if not self.reachable() and not self._ahead.in_flight():
            self._warn("unreachable", f"the Lighthouse at {self.url} is unreachable; training on without "
                       "peers until it answers again (warned once)")
            return []
        plan = self._ahead.take(block=self._block)
        if plan is None:  # not there yet, and not waited for (a group just retired)
            return []
        self._block = not plan.retiring
        try:
            if plan.failed is not None:
                err = plan.failed
                self._warn(f"quorum{type(err).__name__}", f"no quorum for exchange {e} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:120] if str(err) else ''}); training on without peers "
                           "(warned once)")
                return []
            if not plan.peers:
                return []
            self._payload_size = payload.numel()
            out = self._collective(plan, payload, e)
        finally:
            self._ahead.request()  # after the collective: the member data carries its outcome
        return [PeerPayload(int(m.data["group"]), pe, body) for m, (pe, body) in zip(plan.members, out)
                if m.replica_id != self.replica_id and pe != NO_PREDICTIONS]

    def _collective(self, plan: Plan, payload: torch.Tensor, e: int) -> list[tuple[int, torch.Tensor]]:
        """The all-gather of framed payloads over the plan's members: (exchange, payload) per
        member, [] when it failed (the generation rises, so every member reconfigures)."""
        from torch._C._distributed_c10d import AllgatherOptions

        self.generation = max(self.generation, plan.generation)
        mine = frame(payload, e)
        try:
            self._configure(plan.members, plan.quorum_id)
            out = [torch.empty_like(mine) for _ in plan.members]
            self.pg.allgather([out], [mine], AllgatherOptions()).wait()
        except Exception as err:  # noqa: BLE001 -- gloo reports a lost peer as RuntimeError
            self.generation += 1
            self._pg_key = None
            self.pg.abort()
            self._warn(f"round{e}", f"exchange {e} with groups {[m.data['group'] for m in plan.members]} "
                       f"failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); training on")
            return []
        return [unframe(b) for b in out]

    def _configure(self, members: list[Any], quorum_id: int) -> None:
        """A new gloo process group only when the quorum (the Lighthouse bumps its id whenever
        membership changes), our member list or the generation changed; the store prefix names
        all three, so a reconfiguration never reads a previous one's rendezvous keys."""
        ids = tuple(m.replica_id for m in members)
        key = (quorum_id, ids, self.generation)
        if key == self._pg_key:
            return
        prefix = f"codistill/q{quorum_id}/g{self.generation}/{'.'.join(ids)}"
        self.pg.configure(f"{members[0].store_address}/{prefix}", self.replica_id,
                          ids.index(self.replica_id), len(ids))
        self._pg_key = key

    def _warn(self, key: str, text: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("group %d: %s", self.group_id, text)



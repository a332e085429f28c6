"""One group's membership of the torchft Lighthouse: heartbeats, quorums, one collective per round.

The group's leader holds a `LighthouseMember`; each exchange round asks the Lighthouse for a
quorum of the groups alive now (`view`), configures torchft's reconfigurable gloo process group
over them (only when membership changed, `quorum_pg.QuorumGroup`) and runs one collective: an
all-gather of whole-batch payloads (`round`), or an all-to-all whose part for group h is what h
alone trains on (`round_to_owners`, `exchange_batch: train`). On route `rails` the leader only
asks; its ranks run the collective on their rails over the view it broadcasts (`rails.py`). The
member data carries the exchange contract (`contract.py`) and who takes part; each frame of the
collective carries its exchange index, byte count and the loss the group reports of itself
(`frames.py`), so the payload is the predictions (or weights) only. With a shared secret the
member data and every frame of every collective (all-gather, all-to-all, each rail) carry HMAC
tags (`trust.py`); members that do not verify are left out before any process group is
configured.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import torch

from codistill_ds.config import ConfigError
from codistill_ds.exchange.transport import trust
from codistill_ds.exchange.transport.contract import (
    IncompatibleGroup,
    contract_mismatch,
    reference_contract,
)
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
    """A group leader's membership: heartbeats, one quorum per round, the reconfigurable gloo
    process group over the compatible members, and the route `leaders` collective on it."""

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

    def close(self) -> None:
        self._stop.set()
        self.pg.close()

    def _quorum(self, e: int, joining: bool):
        fields = {"group": self.group_id, "exchange": e, "contract": self.contract, "nonce": self.nonce,
                  "started": self.started, "gen": self.generation, "joining": joining, "replica": self.replica_id}
        return self.client.quorum(replica_id=self.replica_id, timeout=self.timeout, address="",
                                  store_address=self.store_address, step=max(e, 0), world_size=1,
                                  shrink_only=False, data=trust.seal(fields, self.key))

    def _members(self, quorum, seen: dict[str, trust.Member] | None = None) -> list[trust.Member]:
        """The quorum's participants this round may exchange with, in replica-id order: those
        whose member data verifies under my secret (trust.py), then those holding the contract
        most of them share (a newcomer never displaces the running groups), then one job per
        group id, the oldest (a second job claiming a running group's id is refused). Raises
        `IncompatibleGroup` when the refusal is mine; everyone else computes the same list from
        the same member data and leaves the refused job out. `seen` (while joining) collects the
        members of every quorum so far: the Lighthouse may answer a newcomer with quorums that
        hold only some of the running groups, so the refusal counts all of them."""
        everyone = [trust.open_member(p, self.key) for p in quorum.participants]
        if seen is not None:
            seen.update((m.replica_id, m) for m in everyone)
        why = trust.refusal(list(seen.values()) if seen is not None else everyone, self.key)
        if why is not None:
            raise IncompatibleGroup("codistill.secret_file", why)
        for m in everyone:
            if not m.verified:
                self._warn(f"auth{m.replica_id}", f"left quorum member {m.replica_id} out of every round: its "
                           "member data does not verify under this job's shared secret (or lack of one)")
        parts = [m for m in everyone if m.verified]
        reference = reference_contract([m.data for m in parts])
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
        """Block until all `groups` groups are present (or `wait_s` passed); returns how many are."""
        deadline = time.monotonic() + wait_s
        present, seen = 0, {}
        while True:
            try:
                members = self._members(self._quorum(-1, joining=True), seen)
                present = len({m.data["group"] for m in members})
            except IncompatibleGroup:
                raise
            except Exception as err:  # noqa: BLE001 -- no quorum within the timeout: ask again until the deadline
                self.last_quorum_error = err
            if present >= groups or time.monotonic() >= deadline:
                return present
            time.sleep(0.05)

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

    def view(self, e: int) -> RoundView | None:
        """Who takes part in exchange round e: the quorum's compatible groups that are not still
        joining, or None (no quorum in time, the Lighthouse unreachable, or nobody else here).
        Raises `IncompatibleGroup` when this job is refused."""
        if not self.reachable():
            self._warn("unreachable", f"the Lighthouse at {self.url} is unreachable; training on without "
                       "peers until it answers again (warned once)")
            return None
        try:
            quorum = self._quorum(e, joining=False)
        except Exception as err:  # noqa: BLE001 -- Lighthouse unreachable or no quorum in time
            self._warn(f"quorum{type(err).__name__}", f"no quorum for exchange {e} ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120] if str(err) else ''}); training on without peers "
                       "(warned once)")
            return None
        members = [m for m in self._members(quorum) if not m.data.get("joining")]
        if len(members) < 2 or not any(m.replica_id == self.replica_id for m in members):
            return None
        self.generation = max(self.generation, *(int(m.data.get("gen", 0)) for m in members))
        return RoundView(int(quorum.quorum_id), self.generation, tuple(m.replica_id for m in members),
                         tuple(int(m.data["group"]) for m in members), members[0].store_address)

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



"""Rails between group jobs: rank r of every group present, on its own process group.

Route `rails` and weight exchange under `transport: torchft` (docs/design.md, "Transports"). The
point of a rail is that rank r's bytes cross only rank r's (node r's) link, with no gather inside
the group: through the leader every byte would cross the leader's link, which is route
`leaders`. So the payload travels rank to rank, while membership stays with the group's one
Lighthouse member (its leader):

    leader: quorum view of round e -> broadcast the view to my group (a few hundred bytes)
    every rank r: collective over rail r of the view's groups (`quorum_pg.QuorumGroup`)
    every rank: `agree` -> the peers all of my ranks received, on the same exchange

Every rail's frames carry the same header and, with a shared secret, the same tag as the
leaders' (`frames.py`): rank r signs its slice with the secret and checks rank r of each peer
before anything is unpacked, so the secret protects route rails and weight exchange exactly as
it does route leaders. A frame refused on any rank (tag, length) drops that peer on every rank
of my group, counted once by reason; the peers' reports are agreed in the same all-reduce.

One member per group rather than per rank: all S x K members would have to request every quorum
together, and a rank that had seen every group in a start-up join would stop asking while its
neighbours still waited, holding their quorums back until the Lighthouse's join timeout (seen:
a 120 s join that found nobody). With one view per round every rail meets the same groups; only
a failure mid-round can leave one rail without a peer another rail got, which `agree` removes
(and which raises the leader's generation, so every rail reconfigures at the next round).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.transport.contract import IncompatibleGroup
from codistill_ds.exchange.transport.frames import NO_PREDICTIONS
from codistill_ds.exchange.transport.lighthouse import LighthouseMember, _route_to
from codistill_ds.exchange.transport.quorum_pg import (
    AllGather,
    AllToAll,
    Collective,
    PeerPayload,
    QuorumGroup,
)

log = logging.getLogger(__name__)

PROBLEMS = ("malformed", "auth")
"""Why the transport refuses a frame (`trust.open_frame`), in the order a code ranks them."""


@dataclass
class RailRound:
    """What a round on the rails gave my group: the peers every rank received intact on the
    same exchange (with their agreed reports), the bytes this rank sent, and the peers refused
    on some rank by reason (the same on every rank of my group)."""

    peers: list[PeerPayload]
    sent: int
    rejected: dict[str, int] = field(default_factory=dict)


class FTRails:
    """Rank r's side of the rails between group jobs: `member` is my leader's Lighthouse
    membership (None on the other ranks); every rank calls every method, in the same order."""

    def __init__(self, topology: Topology, member: LighthouseMember | None, lighthouse: str, timeout_s: float,
                 key: bytes | None = None, to_owners: bool = False) -> None:
        """`to_owners`: my group's rounds are all-to-alls (`exchange_batch: train`), which a
        farewell round must match; `key`: the shared secret, or None."""
        import os

        self.t, self.member, self.to_owners = topology, member, to_owners
        self._leader = topology.dims.leader_of(topology.group_id)
        _, iface = _route_to(lighthouse)  # my rail's gloo sockets on the interface that reaches the peers
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        self.pg = QuorumGroup(timeout_s, f"rail{topology.position}", key)

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous: my leader waits for `groups` groups; returns how many came."""
        present = self.member.join(groups, wait_s) if self.member is not None else 0
        return comm.broadcast_object(present, src=self._leader, group=self.t.exchange_group)

    def all_gather(self, e: int, payload: torch.Tensor, report: dict | None = None) -> RailRound:
        """My payload (any dtype, flat) to rank r of each peer present, theirs back in its dtype."""
        raw = payload.reshape(-1).contiguous().view(torch.uint8)
        out = self._round(e, AllGather(raw), lambda got: raw.numel() * len(got), report)
        for p in out.peers:
            p.payload = p.payload.view(payload.dtype).to(payload.device)
        return out

    def all_to_all(self, e: int, parts: dict[int, torch.Tensor], report: dict | None = None) -> RailRound:
        """My part (flat uint8) for group h to rank r of h alone."""
        return self._round(e, AllToAll(parts), lambda got: sum(parts[p.group].numel() for p in got), report)

    def _round(self, e: int, collective: Collective, sent_by, report: dict | None) -> RailRound:
        header: dict = {"view": None, "error": None}
        if self.member is not None:
            try:
                header["view"] = self.member.view(e)
            except IncompatibleGroup as err:
                header["error"] = (err.field, err.reason)
        header = comm.broadcast_object(header, src=self._leader, group=self.t.exchange_group)
        if header["error"] is not None:
            raise IncompatibleGroup(*header["error"])
        view, got, failed = header["view"], [], None
        if view is not None:
            try:
                got = self.pg.run(view, self.t.group_id, collective, e, report)
            except Exception as err:  # noqa: BLE001 -- gloo reports a lost peer as RuntimeError
                failed = err
        sent = sent_by(got)  # what crossed from this rank, whether or not my group keeps it
        kept, any_failed, rejected = agree(got, self.t, failed is not None)
        if self.member is not None and view is not None:
            if any_failed:
                self.member.failed(e, view, failed or "a rail of this group failed")
            self.member.done()  # every rail is over: ask for the next round's quorum
        return RailRound(kept, sent, rejected)

    def close(self, retire: bool = True) -> None:
        """Leave; `retire` (a job that ends, or `codistill-ds retire`): my leader takes the round
        it had already agreed to (`LighthouseMember.farewell_view`), every rail takes part in it
        without payload (its peers count on it), then the leader leaves a retire mark. Every rank
        of my group calls it (the end of a run), so the view's broadcast cannot hang."""
        view = None
        if retire:
            view = self.member.farewell_view() if self.member is not None else None
            view = comm.broadcast_object(view, src=self._leader, group=self.t.exchange_group)
        if view is not None:
            nothing = AllToAll({}) if self.to_owners else AllGather(None)
            try:
                self.pg.run(view, self.t.group_id, nothing, NO_PREDICTIONS)
            except Exception as err:  # noqa: BLE001 -- leaving anyway: the others drop that round
                log.warning("group %d: the last round before leaving failed on rail %d (%s: %s)", self.t.group_id,
                            self.t.position, type(err).__name__, err)
        self.pg.close()
        if self.member is not None:
            if retire:
                self.member.retire_mark()
            self.member.close(retire=False)


def agree(got: list[PeerPayload], t: Topology, failed: bool = False) -> tuple[list[PeerPayload], bool, dict[str, int]]:
    """The peers that every rank of my group received intact in this round, on the same
    exchange, whether any rank's collective failed, and the peers some rank refused, by reason.
    Every rank must distill on the same peers (a ZeRO-3 teacher's forward is even a collective
    over the group), and a peer can die between two rails' collectives. One all-reduce (max)
    over the exchange's own copy of my group; per peer group: e+2 and -(e+2) (kept where max ==
    min), the refusal code (index in PROBLEMS + 1), the reported loss (-inf: none; a loss that
    is not a number: +inf, which the guard counts as worse) and step; then `failed`. Ranks of a
    group report the same logged mean, so the agreed report is that one (or the worst claimed)."""
    k = t.groups
    v = torch.zeros(5 * k + 1, dtype=torch.float64)
    v[3 * k:4 * k] = -math.inf
    v[4 * k:5 * k] = -1
    for p in got:
        if p.problem is not None:
            v[2 * k + p.group] = PROBLEMS.index(p.problem) + 1 if p.problem in PROBLEMS else len(PROBLEMS)
            continue
        v[p.group], v[k + p.group] = p.exchange + 2, -(p.exchange + 2)
        if p.report is not None:
            loss = float(p.report.get("loss", math.inf))
            v[3 * k + p.group] = math.inf if math.isnan(loss) else loss
            v[4 * k + p.group] = float(p.report.get("step", -1))
    v[5 * k] = float(failed)
    if t.group_size > 1:
        comm.all_reduce(v, op=comm.ReduceOp.MAX, group=t.exchange_group)
    kept = []
    for p in got:
        g = p.group
        if p.problem is None and v[g] > 0 and v[g] == -v[k + g] and v[2 * k + g] == 0:
            loss = float(v[3 * k + g])
            p.report = None if loss == -math.inf else {"loss": loss, "step": int(v[4 * k + g])}
            kept.append(p)
    rejected: dict[str, int] = {}
    for g in range(k):
        code = int(v[2 * k + g])
        if code:
            why = PROBLEMS[min(code, len(PROBLEMS)) - 1]
            rejected[why] = rejected.get(why, 0) + 1
    return kept, bool(v[5 * k] > 0), rejected

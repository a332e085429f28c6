"""Rails between group jobs: rank r of every group present, on its own process group.

Route `rails` and weight exchange under `transport: torchft` (docs/design.md, "Transports"). The
point of a rail is that rank r's bytes cross only rank r's (node r's) link, with no gather inside
the group: through the leader every byte would cross the leader's link, which is route
`leaders`. So the payload travels rank to rank, while membership stays with the group's one
Lighthouse member (its leader):

    leader: quorum view of round e -> broadcast the view to my group (a few hundred bytes)
    every rank r: collective over rail r of the view's groups (`quorum_pg.QuorumGroup`)
    every rank: `agree` -> the peers all of my ranks received, on the same exchange

One member per group rather than per rank: all S x K members would have to request every quorum
together, and a rank that had seen every group in a start-up join would stop asking while its
neighbours still waited, holding their quorums back until the Lighthouse's join timeout (seen:
a 120 s join that found nobody). With one view per round every rail meets the same groups; only
a failure mid-round can leave one rail without a peer another rail got, which `agree` removes
(and which raises the leader's generation, so every rail reconfigures at the next round).
"""

from __future__ import annotations

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.transport.contract import IncompatibleGroup
from codistill_ds.exchange.transport.lighthouse import LighthouseMember, _route_to
from codistill_ds.exchange.transport.quorum_pg import (
    PeerPayload,
    QuorumGroup,
    allgather,
    alltoall,
)


class FTRails:
    """Rank r's side of the rails between group jobs: `member` is my leader's Lighthouse
    membership (None on the other ranks); every rank calls every method, in the same order."""

    def __init__(self, topology: Topology, member: LighthouseMember | None, lighthouse: str, timeout_s: float) -> None:
        import os

        self.t, self.member = topology, member
        self._leader = topology.dims.leader_of(topology.group_id)
        _, iface = _route_to(lighthouse)  # my rail's gloo sockets on the interface that reaches the peers
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        self.pg = QuorumGroup(timeout_s, f"rail{topology.position}")

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous: my leader waits for `groups` groups; returns how many came."""
        present = self.member.join(groups, wait_s) if self.member is not None else 0
        return comm.broadcast_object(present, src=self._leader, group=self.t.exchange_group)

    def all_gather(self, e: int, payload: torch.Tensor) -> tuple[list[PeerPayload], int]:
        """My payload to rank r of each peer present, theirs back: (peers kept, bytes I sent)."""
        return self._round(e, allgather(payload), lambda got: payload.numel() * payload.element_size() * len(got))

    def all_to_all(self, e: int, parts: dict[int, torch.Tensor]) -> tuple[list[PeerPayload], int]:
        """My part for group h to rank r of h alone: (peers kept, bytes I sent)."""
        return self._round(e, alltoall(parts), lambda got: sum(parts[p.group].numel() for p in got))

    def _round(self, e: int, collective, sent_by) -> tuple[list[PeerPayload], int]:
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
                got = self.pg.run(view, self.t.group_id, collective)
            except Exception as err:  # noqa: BLE001 -- gloo reports a lost peer as RuntimeError
                failed = err
        sent = sent_by(got)  # what crossed from this rank, whether or not my group keeps it
        kept, any_failed = agree(got, self.t, failed is not None)
        if any_failed and self.member is not None:
            self.member.failed(e, view, failed or "a rail of this group failed")
        return kept, sent

    def close(self) -> None:
        self.pg.close()
        if self.member is not None:
            self.member.close()


def agree(got: list[PeerPayload], t: Topology, failed: bool = False) -> tuple[list[PeerPayload], bool]:
    """The peers that every rank of my group received in this round, on the same exchange, and
    whether any rank's collective failed. Every rank must distill on the same peers (a ZeRO-3
    teacher's forward is even a collective over the group), and a peer can die between two
    rails' collectives. One all-reduce (max) over the exchange's own copy of my group of
    [e+2 per peer group, -(e+2) per peer group, failed]: a peer is kept where max == min."""
    k = t.groups
    v = torch.zeros(2 * k + 1, dtype=torch.float64)
    for p in got:
        v[p.group], v[k + p.group] = p.exchange + 2, -(p.exchange + 2)
    v[2 * k] = float(failed)
    if t.group_size > 1:
        comm.all_reduce(v, op=comm.ReduceOp.MAX, group=t.exchange_group)
    return [p for p in got if v[p.group] > 0 and v[p.group] == -v[k + p.group]], bool(v[2 * k] > 0)

"""One round's collective over the groups of a quorum, on torchft's reconfigurable gloo group.

A Lighthouse quorum (`lighthouse.LighthouseMember.view`) says which groups take part in a round;
a `QuorumGroup` turns that into a process group and runs one collective on it. The leader's own
member runs the `leaders` route's round on one; on route `rails` (and for weight exchange) every
rank r holds one for rail r, configured from the *same* view its leader received (broadcast
inside the group), so rank r of each group present meets rank r of the others with one
Lighthouse member per group (not per rank: every member must request each quorum, and members
that leave a join early would hold the others' quorums back until the Lighthouse's join
timeout). The store prefix names the quorum, the generation, the rail and the members, so a
reconfiguration never reads another rail's or a previous round's rendezvous keys.

Two collectives: `allgather(payload)` (every payload the same size) and `alltoall(parts)`
(`exchange_batch: train`: the part for group h goes to h alone, split sizes, nothing to myself).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import torch

Collective = Callable[[object, list[int], int], list[torch.Tensor]]
"""`collective(pg, groups, me)`: one tensor per member (mine empty or my own), in member order."""


@dataclass(frozen=True)
class RoundView:
    """Who takes part in a round, as the Lighthouse formed it: plain values, so a leader can
    broadcast it to its ranks. Members are in replica-id order, one per group."""

    quorum_id: int
    generation: int
    replica_ids: tuple[str, ...]
    groups: tuple[int, ...]
    exchanges: tuple[int, ...]
    store_address: str
    """The first member's store, where every process group of the round meets."""

    def index(self, group: int) -> int:
        return self.groups.index(group)


@dataclass
class PeerPayload:
    """One peer group's payload from a round."""

    group: int
    exchange: int
    payload: torch.Tensor


class QuorumGroup:
    """A reconfigurable gloo process group over the groups of the latest view (one per rail)."""

    def __init__(self, timeout_s: float, tag: str) -> None:
        from torchft.process_group import ProcessGroupGloo

        self.tag = tag
        self.pg = ProcessGroupGloo(timeout=datetime.timedelta(seconds=timeout_s))
        self._key: tuple | None = None

    def run(self, view: RoundView, group: int, collective: Collective) -> list[PeerPayload]:
        """The collective over the view's members; the peers' tensors in group order. A failure
        (a peer died or stopped mid-way) aborts the process group, so the next round configures
        a new one, and re-raises."""
        me = view.index(group)
        key = (view.quorum_id, view.replica_ids, view.generation)
        try:
            if key != self._key:
                prefix = f"codistill/q{view.quorum_id}/g{view.generation}/{self.tag}/{'.'.join(view.replica_ids)}"
                self.pg.configure(f"{view.store_address}/{prefix}", view.replica_ids[me], me, len(view.replica_ids))
                self._key = key
            out = collective(self.pg, list(view.groups), me)
        except Exception:
            self._key = None
            self.pg.abort()
            raise
        got = [PeerPayload(g, e, out[i]) for i, (g, e) in enumerate(zip(view.groups, view.exchanges)) if i != me]
        return sorted(got, key=lambda p: p.group)  # group order, as `transport: world` delivers

    def close(self) -> None:
        self.pg.abort(errored=False)


def allgather(payload: torch.Tensor) -> Collective:
    """Every member's payload (all the same size)."""
    def run(pg, groups: list[int], me: int) -> list[torch.Tensor]:
        from torch._C._distributed_c10d import AllgatherOptions

        out = [torch.empty_like(payload) for _ in groups]
        pg.allgather([out], [payload], AllgatherOptions()).wait()
        return out

    return run


def alltoall(parts: dict[int, torch.Tensor]) -> Collective:
    """My part for group h to h alone, each peer's part for me back (an all-to-all with split
    sizes: what crosses is only what its receiver trains on). Every part has the same size, and
    every group of the round has one: the contract of `exchange_batch: train` holds the group
    count and shape (`contract.py`)."""
    def run(pg, groups: list[int], me: int) -> list[torch.Tensor]:
        from torch._C._distributed_c10d import AllToAllOptions

        size = next(iter(parts.values())).numel()
        empty = next(iter(parts.values()))[:0]
        sends = [empty if i == me else parts[g] for i, g in enumerate(groups)]
        splits = [0 if i == me else size for i in range(len(groups))]
        out = torch.empty(size * (len(groups) - 1), dtype=empty.dtype)
        pg.alltoall_base(out, torch.cat(sends), splits, splits, AllToAllOptions()).wait()
        chunks = iter(out.split(size))
        return [empty if i == me else next(chunks) for i in range(len(groups))]

    return run

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

Two collectives: `AllGather(payload)` (every member's payload) and `AllToAll(parts)`
(`exchange_batch: train`: the part for group h goes to h alone, nothing to myself). Both move
frames (`frames.py`: exchange index, byte count and report in a header, HMAC tag with a shared
secret), checked before anyone unpacks them; a refused frame comes back as a `PeerPayload` with
its `problem` set. The frame size is agreed once per configured process group: an all-gather of
each member's declared payload size (8 bytes each), `trust.frame_size` over them (capped), so a
member's own bad buffer never desynchronizes gloo, and an honest payload (the contract makes
every member's the same size) always fits.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from codistill_ds.exchange.transport import frames, trust


@dataclass(frozen=True)
class RoundView:
    """Who takes part in a round, as the Lighthouse formed it: plain values, so a leader can
    broadcast it to its ranks. Members are in replica-id order, one per group."""

    quorum_id: int
    generation: int
    replica_ids: tuple[str, ...]
    groups: tuple[int, ...]
    store_address: str
    """The first member's store, where every process group of the round meets."""

    def index(self, group: int) -> int:
        return self.groups.index(group)

    @property
    def round_id(self) -> str:
        """What a frame tag binds a frame to (`trust.frame_tag`): the quorum, the generation
        and the member list."""
        return f"{self.quorum_id}/{self.generation}/{','.join(self.replica_ids)}"


@dataclass
class PeerPayload:
    """One peer group's frame from a round: its payload (None, with the reason in `problem`,
    when the frame did not verify or had the wrong length: skipped, never unpacked), the
    exchange it predicted on and the report it sent (its recent loss, for the peer guard)."""

    group: int
    exchange: int
    payload: torch.Tensor | None
    report: dict | None = None
    problem: str | None = None


class AllGather:
    """Every member's payload (flat uint8; None: I send nothing this round)."""

    def __init__(self, payload: torch.Tensor | None) -> None:
        self.payload = payload
        self.nbytes = 0 if payload is None else payload.numel()

    def run(self, pg, view: RoundView, me: int, seal, open_) -> list[frames.Opened | None]:
        from torch._C._distributed_c10d import AllgatherOptions

        mine = seal(self.payload, None)
        out = [torch.empty_like(mine) for _ in view.groups]
        pg.allgather([out], [mine], AllgatherOptions()).wait()
        return [None if i == me else open_(out[i], i, None) for i in range(len(view.groups))]


class AllToAll:
    """My part for group h to h alone, each peer's part for me back (an all-to-all with split
    sizes: what crosses is only what its receiver trains on). Every group of the round has a
    part: the contract of `exchange_batch: train` holds the group count and shape
    (`contract.py`); each part's frame is bound to its receiver."""

    def __init__(self, parts: dict[int, torch.Tensor]) -> None:
        self.parts = parts
        self.nbytes = max((p.numel() for p in parts.values()), default=0)  # every honest part: the same

    def run(self, pg, view: RoundView, me: int, seal, open_) -> list[frames.Opened | None]:
        from torch._C._distributed_c10d import AllToAllOptions

        sends = [seal(self.parts.get(g), view.replica_ids[i]) for i, g in enumerate(view.groups) if i != me]
        n = sends[0].numel()
        splits = [0 if i == me else n for i in range(len(view.groups))]
        out = torch.empty(n * len(sends), dtype=torch.uint8)
        pg.alltoall_base(out, torch.cat(sends), splits, splits, AllToAllOptions()).wait()
        chunks = iter(out.split(n))
        return [None if i == me else open_(next(chunks), i, view.replica_ids[me]) for i in range(len(view.groups))]


Collective = AllGather | AllToAll


class QuorumGroup:
    """A reconfigurable gloo process group over the groups of the latest view (one per rail);
    `key` is the shared secret (`trust.py`) that signs and checks its frames, or None."""

    def __init__(self, timeout_s: float, tag: str, key: bytes | None = None) -> None:
        from torchft.process_group import ProcessGroupGloo

        self.tag, self.key = tag, key
        self.pg = ProcessGroupGloo(timeout=datetime.timedelta(seconds=timeout_s))
        self._key: tuple | None = None
        self.size: int | None = None
        """Payload bytes of every frame on the configured process group (agreed on its first round)."""

    def run(self, view: RoundView, group: int, collective: Collective, e: int,
            report: dict | None = None) -> list[PeerPayload]:
        """The collective over the view's members: every peer's frame checked, in group order
        (refused frames included, with `problem` set; members that sent nothing left out). A
        failure (a peer died or stopped mid-way) aborts the process group, so the next round
        configures a new one, and re-raises."""
        me = view.index(group)
        key = (view.quorum_id, view.replica_ids, view.generation)
        try:
            if key != self._key:
                prefix = f"codistill/q{view.quorum_id}/g{view.generation}/{self.tag}/{'.'.join(view.replica_ids)}"
                self.pg.configure(f"{view.store_address}/{prefix}", view.replica_ids[me], me, len(view.replica_ids))
                self._key, self.size = key, None
            size = self.size if self.size is not None else self._agree_size(collective.nbytes, len(view.groups))
            self.size = size or None  # nobody declared a size: agree again next round
            rid, sender = view.round_id, view.replica_ids[me]

            def seal(payload: torch.Tensor | None, receiver: str | None) -> torch.Tensor:
                if payload is None:
                    return frames.seal(torch.empty(0, dtype=torch.uint8), size, frames.NO_PREDICTIONS, None,
                                       self.key, _bound(rid, receiver), sender)
                return frames.seal(payload, size, e, report, self.key, _bound(rid, receiver), sender)

            def open_(buf: torch.Tensor, i: int, receiver: str | None) -> frames.Opened | None:
                return frames.open_sealed(buf, size, collective.nbytes, self.key, _bound(rid, receiver),
                                          view.replica_ids[i])

            out = collective.run(self.pg, view, me, seal, open_)
        except Exception:
            self._key = None
            self.pg.abort()
            raise
        got = [PeerPayload(g, o.exchange, o.payload, o.report, o.problem)
               for g, o in zip(view.groups, out) if o is not None]
        return sorted(got, key=lambda p: p.group)  # group order, as `transport: world` delivers

    def _agree_size(self, nbytes: int, members: int) -> int:
        """Each member's declared payload size, all-gathered; the frame size every member then
        uses (`trust.frame_size`; a member with nothing to send declares 0 and has no say)."""
        from torch._C._distributed_c10d import AllgatherOptions

        mine = torch.tensor([nbytes], dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(members)]
        self.pg.allgather([out], [mine], AllgatherOptions()).wait()
        declared = [int(x) for x in out if int(x) > 0]
        return trust.frame_size(declared) if declared else 0

    def close(self) -> None:
        self.pg.abort(errored=False)


def _bound(round_id: str, receiver: str | None) -> str:
    """The round id a frame's tag binds, with the receiver for a part meant for one member."""
    return round_id if receiver is None else f"{round_id}>{receiver}"

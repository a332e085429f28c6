"""Weight exchange (`codistill.mode: weights`): the method of Anil et al. 2018 and Sodhani et al.

Every `interval` steps each rank sends its own parameter shard to its rail counterparts (rank r
of every other group). Because all groups shard the same architecture the same way, rank r's
shard of group h is exactly the slice rank r of my group needs to hold a frozen, sharded copy
of h's replica: the *teacher*. Between exchanges each group distills toward its teachers'
predictions on its own training batch, so no shared exchange batch is needed and the
teachers may be thousands of steps stale. The costs are memory (one sharded copy per peer)
and one teacher forward per peer per step; `codistill-ds plan --mode weights` reports both.

With `transport: torchft` the shards travel over the rails between group jobs
(`transport/rails.py`: my leader's Lighthouse view of the round, then rank r's own process group
over rail r of the groups in it): rank r's shard crosses only rank r's link, as over the world's
rail groups, and a round swaps shards with the peers present. The ranks of my group then keep
the peers all of them received (`rails.agree`), because a teacher is loaded shard by shard and
its forward is a collective over my group. A peer that missed a round keeps
its last weights as a stale teacher (`codistill.stale_teachers: keep`, the papers' setting:
teachers thousands of steps old still help) or is left out until it is back (`drop`); a peer
never received is never a teacher.
"""

from __future__ import annotations

import hashlib
import time

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.engine import ExchangeSettings
from codistill_ds.exchange.wire import CompressedLogits, compress


def flatten(shards: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous buffer so the whole shard crosses groups in one collective."""
    return torch.cat([s.detach().reshape(-1) for s in shards])


def digest(shards: list[torch.Tensor]) -> str:
    """Bit-exact fingerprint of a list of shards (tests compare teachers to senders with it)."""
    h = hashlib.sha1()
    for s in shards:
        h.update(s.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WeightExchange:
    """Keeps one teacher per peer group and refreshes them from the rail every `interval` steps
    (the loop's `Teachers`).

    Args:
        topology, backend: my group's process groups and sharded replica.
        interval, settings: steps between swaps; the loss settings of the targets.
        rails: `transport: torchft`: my rank's side of the rails between group jobs
            (`rails.FTRails`; None: the world's rail group, every peer in every round).
        stale: "keep" | "drop": what a peer missing from the latest round is (`stale_teachers`).
    """

    def __init__(self, topology: Topology, backend, interval: int, settings: ExchangeSettings,
                 rails=None, stale: str = "keep") -> None:
        self.t, self.backend, self.interval, self.settings = topology, backend, interval, settings
        self.rails, self.stale = rails, stale
        self.all_peers = [g for g in range(topology.groups) if g != topology.group_id]
        self.teachers = {g: backend.make_teacher() for g in self.all_peers}
        self.loaded: set[int] = set()
        """Peers whose weights a teacher holds (received at least once)."""
        self.present: set[int] = set()
        """Peers of the latest round."""
        self.bytes_sent = 0
        self.last_sent_digest: str | None = None
        self.rejected: dict[str, int] = {}
        """Peer shards the rails refused (`transport: torchft`: a frame tag that does not verify,
        a wrong byte length), by reason: never loaded into a teacher."""

    @property
    def peer_groups(self) -> list[int]:
        """The teachers the targets come from, in group order: every peer received so far, or
        with `drop` only the peers of the latest round."""
        use = self.loaded if self.stale == "keep" else self.loaded & self.present
        return sorted(use)

    def exchange(self, e: int = 0) -> float:
        """Swap shards with my rail and load each peer's into its teacher; returns seconds."""
        start = time.perf_counter()
        mine = self.backend.shards()
        self.last_sent_digest = digest(mine)
        flat = flatten(mine)
        if self.rails is None:
            out = comm.all_gather(flat, group=self.t.rail)
            self.bytes_sent += flat.numel() * flat.element_size() * (self.t.groups - 1)
            got = {g: out[g] for g in self.all_peers}
        else:
            out = self.rails.all_gather(e, flat)  # framed, and signed with the shared secret if any
            self.bytes_sent += out.sent
            got = {p.group: p.payload for p in out.peers}
            for why, n in out.rejected.items():
                self.rejected[why] = self.rejected.get(why, 0) + n
        sizes = [s.numel() for s in mine]
        for g, buf in got.items():
            self.teachers[g].load_shards(list(buf.split(sizes)))
        self.loaded |= set(got)
        self.present = set(got)
        return time.perf_counter() - start

    def join(self, groups: int, wait_s: float) -> int:
        """`transport: torchft`: the start-up rendezvous (`rails.FTRails.join`)."""
        return self.t.groups if self.rails is None else self.rails.join(groups, wait_s)

    def close(self) -> None:
        if self.rails is not None:
            self.rails.close()

    def refresh(self, step: int) -> float | None:
        """Swap weights at exchange steps; milliseconds taken, or None between exchanges."""
        return self.exchange(step // self.interval) * 1e3 if step % self.interval == 0 else None

    def targets(self, input_ids: torch.Tensor) -> list[CompressedLogits]:
        """Each teacher's full-vocabulary fp32 predictions on my batch: the teachers are local,
        so nothing is compressed away."""
        kind = "logits" if self.settings.loss == "mse" else "logprobs"
        return [compress(p.flatten(0, 1), 0, torch.float32, kind, self.settings.temperature)
                for p in self.predictions(input_ids)]

    @torch.no_grad()
    def predictions(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's logits on my batch, [B, L, V] per peer, no graph kept."""
        return [self.teachers[g].forward(input_ids) for g in self.peer_groups]

"""Weight exchange (`codistill.mode: weights`): the method of Anil et al. 2018 and Sodhani et al.

Every `interval` steps each rank sends its own parameter shard to its rail counterparts (rank r
of every other group). Because all groups shard the same architecture the same way, rank r's
shard of group h is exactly the slice rank r of my group needs to hold a frozen, sharded copy
of h's replica: the *teacher*. Between exchanges each group distills toward its teachers'
predictions on its own training batch, so no shared exchange batch is needed and the
teachers may be thousands of steps stale. The costs are memory (one sharded copy per peer)
and one teacher forward per peer per step; `codistill-ds plan --mode weights` reports both.
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
    (the loop's `Teachers`)."""

    def __init__(self, topology: Topology, backend, interval: int, settings: ExchangeSettings) -> None:
        self.t, self.backend, self.interval, self.settings = topology, backend, interval, settings
        self.peer_groups = [g for g in range(topology.groups) if g != topology.group_id]
        self.teachers = {g: backend.make_teacher() for g in self.peer_groups}
        self.bytes_sent = 0
        self.last_sent_digest: str | None = None

    def exchange(self) -> float:
        """Swap shards with my rail and load each peer's into its teacher; returns seconds."""
        start = time.perf_counter()
        mine = self.backend.shards()
        self.last_sent_digest = digest(mine)
        flat = flatten(mine)
        out = comm.all_gather(flat, group=self.t.rail)
        self.bytes_sent += flat.numel() * flat.element_size() * (self.t.groups - 1)
        sizes = [s.numel() for s in mine]
        for g, teacher in self.teachers.items():
            teacher.load_shards(list(out[g].split(sizes)))
        return time.perf_counter() - start

    def refresh(self, step: int) -> float | None:
        """Swap weights at exchange steps; milliseconds taken, or None between exchanges."""
        return self.exchange() * 1e3 if step % self.interval == 0 else None

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

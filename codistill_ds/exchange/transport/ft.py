"""`transport: torchft`: each codistillation group is its own job; groups meet per exchange round.

Codistillation needs only weak synchronization (Anil et al. 2018; Sodhani et al., arXiv
2010.02838): a group can train on without its peers and lose only their predictions. Here the
runtime matches the method. Every group is a separate `torchrun`/`deepspeed` job with its own
world (ZeRO/FSDP shard over all of it), its own checkpoints and its own failures. The group
leaders meet through a torchft Lighthouse (meta-pytorch/torchft): each exchange round asks for a
quorum of the groups alive now, configures torchft's reconfigurable gloo process group over
them, and all-gathers the predictions. A group that dies, stops or loses its link drops out of
the next quorum (after the Lighthouse's heartbeat timeout); the others keep training, with the
distillation term over the peers present. A restarted group resumes from its own checkpoint
(`checkpoint.py`: nothing of a peer is ever loaded, torchft's healing is not used) and is in
the next quorum it asks for.

Per round, on every rank of my group (the leaders route, docs/design.md "Exchange"):

    gather my slice on the leader -> leader: quorum, all-gather whole-batch payloads with the
    compatible peers -> broadcast who answered -> scatter rank r its rows of every peer

Payloads travel as one whole-batch `pack`ed buffer per group, so groups with different rank
counts meet on the same bytes. Who sent what travels in the quorum's member data, the exchange
batch in an 8-byte header of the payload (`quorum.frame`): the byte count is the predictions
only, exactly as in `transport: world`. Inside my group, who answered travels as one small
int64 tensor (`_announce`), not a pickled object.

The quorum is asked one round ahead (`quorum.QuorumAhead`), so a round's critical path is the
all-gather alone; and before the teacher forward the engine may ask `peers_ahead`: a round with
no peer skips the forward (`exchange_compute_ms` 0, `peers` 0). The member data also carries the *exchange contract* (vocabulary,
corpus, shared-stream seed, batch shape, top-k, wire dtype, payload kind, temperature): a
group whose contract differs from the running groups' is refused with one line naming the
field, and nobody else is disturbed; two jobs that claim the same group id are both visible
(each job's replica id carries a nonce) and the younger one is refused.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.transport.contract import IncompatibleGroup
from codistill_ds.exchange.transport.lighthouse import LighthouseMember
from codistill_ds.exchange.wire import CompressedLogits, pack


class TorchFTTransport:
    """The engine's transport between group jobs: gather to my leader, a Lighthouse round there,
    scatter back. Every rank of my group calls `exchange`/`start` for every round."""

    def __init__(self, topology: Topology, member: LighthouseMember | None) -> None:
        self.t, self.member = topology, member
        self.bytes_sent = 0
        self._worker: ThreadPoolExecutor | None = None
        self._last: Future | None = None
        self._leader = topology.dims.leader_of(topology.group_id)

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous of a fresh start (every rank calls it; the leader waits)."""
        present = self.member.join(groups, wait_s) if self.member is not None else 0
        return comm.broadcast_object(present, src=self._leader, group=self.t.exchange_group)

    def exchange(self, local: CompressedLogits | None, e: int) -> ExchangeResult:
        """Blocking swap; `local` None: a round that `peers_ahead` found without peers."""
        return self._swap(local, e)

    def start(self, local: CompressedLogits | None, e: int) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-ft-exchange")
        self._last = self._worker.submit(self._swap, local, e)
        return self._last

    def peers_ahead(self, e: int, alone: bool) -> int | None:
        """How many peers the next round will have, when that is known before the teacher
        forward and agreed on by every rank of my group; None: not known (compute as usual).

        One rank per group: the leader looks at the quorum asked ahead (and waits for it when
        the last round had no peer, or no round is in flight: it forms at once then). Several
        ranks: only after a round without peers (`alone`, the same on every rank), because the
        answer then costs one broadcast over my group; with peers present it is not asked."""
        t = self.t
        if t.group_size > 1 and not alone:
            return None
        n = -1
        if self.member is not None:
            busy = self._last is not None and not self._last.done()
            if busy and alone:
                self._last.exception()  # rounds without peers finish at once
                busy = False
            if not busy:
                got = self.member.peers_ahead(block=alone or self._worker is None)
                n = -1 if got is None else got
        if t.group_size > 1:
            flag = torch.tensor([n], dtype=torch.int64)
            comm.broadcast(flag, src=self._leader, group=t.group)
            n = int(flag.item())
        return None if n < 0 else n

    def close(self, retire: bool = True) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.member is not None:
            self.member.close(retire=retire)

    def _swap(self, local: CompressedLogits | None, e: int) -> ExchangeResult:
        start = time.perf_counter()
        t = self.t
        if local is None:
            if self.member is not None:
                self.member.skip_round()
            return ExchangeResult([], [], time.perf_counter() - start, [], 0)
        slices = comm.gather(pack(local), dst=self._leader, group=t.exchange_group)
        peers: list[tuple[int, int]] = []
        error: IncompatibleGroup | None = None
        whole, sent = None, 0
        if slices is not None:
            rows, fmt = local.num_tokens(), local.wire_format()
            whole = _join_slices(slices, rows, local)
            payload = pack(whole)
            try:
                got = self.member.round(e, payload)
                sent = payload.numel() * len(got)
                self.bytes_sent += sent
                peers = [(p.group, p.exchange) for p in got]
                peers_whole = [fmt.unpack(p.payload, whole.num_tokens()) for p in got]
            except IncompatibleGroup as err:
                error = err
                peers_whole = []
        peers = self._announce(peers, error)
        n = len(peers)
        if n == 0:
            return ExchangeResult([], [], time.perf_counter() - start, [], sent)
        mine = torch.empty(n * pack(local).numel(), dtype=torch.uint8)
        parts = None
        if slices is not None:
            rows = local.num_tokens()
            parts = [torch.cat([pack(p.rows(r * rows, (r + 1) * rows)) for p in peers_whole])
                     for r in range(t.group_size)]
        comm.scatter(mine, parts, src=self._leader, group=t.exchange_group)
        size, fmt = mine.numel() // n, local.wire_format()
        peers_mine = [fmt.unpack(mine[i * size:(i + 1) * size], local.num_tokens()) for i in range(n)]
        return ExchangeResult(peers_mine, [g for g, _ in peers], time.perf_counter() - start,
                              [e2 for _, e2 in peers], sent)

    def _announce(self, peers: list[tuple[int, int]], error: IncompatibleGroup | None) -> list[tuple[int, int]]:
        """The leader's (group, exchange) of every peer that answered, on every rank of my group:
        one int64 tensor [refused, n, g1, e1, ...] over the exchange's copy of my group (a
        pickled object costs two broadcasts); the refusal's text follows only when there is one."""
        t = self.t
        if t.group_size > 1:
            slots = t.groups - 1  # peers have distinct group ids below codistill.max_groups (the contract)
            head = torch.zeros(2 + 2 * slots, dtype=torch.int64)
            head[0], head[1] = int(error is not None), len(peers)
            for i, (g, pe) in enumerate(peers):
                head[2 + 2 * i], head[3 + 2 * i] = g, pe
            comm.broadcast(head, src=self._leader, group=t.exchange_group)
            if int(head[0]):
                why = comm.broadcast_object((error.field, error.reason) if error else None, src=self._leader,
                                            group=t.exchange_group)
                error = IncompatibleGroup(*why)
            n = int(head[1])
            peers = [(int(head[2 + 2 * i]), int(head[3 + 2 * i])) for i in range(n)]
        if error is not None:
            raise error
        return peers


def _join_slices(slices: list[torch.Tensor], rows: int, like: CompressedLogits) -> CompressedLogits:
    """My group's slices (rank order) as one whole-batch payload, whatever the group's size."""
    fmt = like.wire_format()
    parts = [fmt.unpack(s, rows) for s in slices]
    values = torch.cat([p.values for p in parts])
    indices = None if like.full_vocab else torch.cat([p.indices for p in parts])
    return CompressedLogits(values, indices, like.kind, like.fmt)

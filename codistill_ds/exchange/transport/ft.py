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
counts meet on the same bytes. Who sent what, and on which exchange batch, travels in the
quorum's member data, not in the payload: the byte count is the predictions only, exactly as
in `transport: world`. The member data also carries the *exchange contract* (vocabulary,
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
        self._leader = topology.dims.leader_of(topology.group_id)

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous of a fresh start (every rank calls it; the leader waits)."""
        present = self.member.join(groups, wait_s) if self.member is not None else 0
        return comm.broadcast_object(present, src=self._leader, group=self.t.exchange_group)

    def exchange(self, local: CompressedLogits, e: int, report: dict | None = None) -> ExchangeResult:
        return self._swap(local, e, report)

    def start(self, local: CompressedLogits, e: int, report: dict | None = None) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-ft-exchange")
        return self._worker.submit(self._swap, local, e, report)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.member is not None:
            self.member.close()

    def _swap(self, local: CompressedLogits, e: int, report: dict | None) -> ExchangeResult:
        start = time.perf_counter()
        t = self.t
        slices = comm.gather(pack(local), dst=self._leader, group=t.exchange_group)
        header: dict = {"peers": [], "error": None, "rejected": {}}
        whole, sent = None, 0
        if slices is not None:
            rows, fmt = local.num_tokens(), local.wire_format()
            whole = _join_slices(slices, rows, local)
            payload = pack(whole)
            try:
                got = self.member.round(e, payload, report)
                sent = self.member.frame_bytes * len(got)
                self.bytes_sent += sent
                for p in got:  # refused by the frame check (tag, length): counted, never unpacked
                    if p.problem is not None:
                        header["rejected"][p.problem] = header["rejected"].get(p.problem, 0) + 1
                got = [p for p in got if p.problem is None]
                header["peers"] = [(p.group, p.exchange, p.report) for p in got]
                peers_whole = [fmt.unpack(p.payload, whole.num_tokens()) for p in got]
            except IncompatibleGroup as err:
                header["error"] = (err.field, err.reason)
                peers_whole = []
        header = comm.broadcast_object(header, src=self._leader, group=t.exchange_group)
        if header["error"] is not None:
            raise IncompatibleGroup(*header["error"])
        n = len(header["peers"])
        if n == 0:
            return ExchangeResult([], [], time.perf_counter() - start, [], sent, [], header["rejected"])
        mine = torch.empty(n * pack(local).numel(), dtype=torch.uint8)
        parts = None
        if slices is not None:
            rows = local.num_tokens()
            parts = [torch.cat([pack(p.rows(r * rows, (r + 1) * rows)) for p in peers_whole])
                     for r in range(t.group_size)]
        comm.scatter(mine, parts, src=self._leader, group=t.exchange_group)
        size, fmt = mine.numel() // n, local.wire_format()
        peers = [fmt.unpack(mine[i * size:(i + 1) * size], local.num_tokens()) for i in range(n)]
        return ExchangeResult(peers, [g for g, _, _ in header["peers"]], time.perf_counter() - start,
                              [e2 for _, e2, _ in header["peers"]], sent, [r for _, _, r in header["peers"]],
                              header["rejected"])


def _join_slices(slices: list[torch.Tensor], rows: int, like: CompressedLogits) -> CompressedLogits:
    """My group's slices (rank order) as one whole-batch payload, whatever the group's size."""
    fmt = like.wire_format()
    parts = [fmt.unpack(s, rows) for s in slices]
    values = torch.cat([p.values for p in parts])
    indices = None if like.full_vocab else torch.cat([p.indices for p in parts])
    return CompressedLogits(values, indices, like.kind, like.fmt)

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

Per round, on every rank of my group (docs/design.md "Exchange"), route `leaders`:

    gather my slice on the leader -> leader: quorum, all-gather whole-batch payloads with the
    compatible peers -> broadcast who answered -> scatter rank r its rows of every peer

Payloads travel as one whole-batch `pack`ed buffer per group, so groups with different rank
counts meet on the same bytes. Route `rails`: the leader's member only asks for the round's
view; every rank swaps its own slice with rank r of the peers in it, no gather and no scatter,
so the cross-group bytes leave from every rank's (every node's) link as in `transport: world`
(`rails.FTRails`). `exchange_batch: train` (`to_owners`): my predictions cover each peer's own
training batch, and the part for group h goes to h alone, as an all-to-all with split sizes
(`quorum_pg.AllToAll`): the bytes counted are what I sent to the groups present, (present
peers) x (their part), never a broadcast. Who takes part travels in the quorum's member data;
on which exchange batch each peer predicted, and the loss it reports of itself (the peer
guard's input), in the header of its frame (`frames.py`), which with a shared secret is signed
and checked on every route and rail (`trust.py`): a refused frame is counted by reason
(`ExchangeResult.rejected`), never unpacked. The byte count is the predictions only, exactly as
in `transport: world`. Inside my group, on route leaders, who answered travels as one small
float64 tensor (`_announce`), not a pickled object.

The quorum is asked one round ahead (`quorum.QuorumAhead`), on every route and mode, so a
round's critical path is its collective alone; and before the teacher forward the engine may
ask `peers_ahead`: a round with no peer skips the forward (`exchange_compute_ms` 0, `peers` 0).
The member data also carries the *exchange contract* (vocabulary,
corpus, shared-stream seed, batch shape, top-k, wire dtype, payload kind, temperature): a
group whose contract differs from the running groups' is refused with one line naming the
field, and nobody else is disturbed; two jobs that claim the same group id are both visible
(each job's replica id carries a nonce) and the younger one is refused.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.transport.contract import IncompatibleGroup
from codistill_ds.exchange.transport.lighthouse import LighthouseMember
from codistill_ds.exchange.transport.rails import PROBLEMS as REJECTIONS
from codistill_ds.exchange.transport.rails import FTRails
from codistill_ds.exchange.wire import CompressedLogits, pack


class TorchFTTransport:
    """The engine's transport between group jobs: on route `leaders` gather to my leader, a
    Lighthouse round there, scatter back; on route `rails` a round on every rank's own member.
    Every rank of my group calls `exchange`/`start` for every round.

    Args:
        topology: my job's process groups (the exchange's own copy of my group is used).
        member: my group's Lighthouse membership (on the leader; None elsewhere).
        route: "leaders" | "rails".
        rails: route rails: my rank's side of the rails (`rails.FTRails`, holding the member).
        to_owners: `exchange_batch: train`: `local` holds my predictions on each peer's batch,
            one chunk per peer in group order, and each chunk goes to that peer alone.
    """

    def __init__(self, topology: Topology, member: LighthouseMember | None, route: str = "leaders",
                 to_owners: bool = False, rails: FTRails | None = None) -> None:
        if route not in ("leaders", "rails") or (route == "rails") != (rails is not None):
            raise ValueError(f"route {route!r} with{'' if rails else 'out'} rails")
        self.t, self.member, self.route, self.to_owners, self.rails = topology, member, route, to_owners, rails
        self.bytes_sent = 0
        self._worker: ThreadPoolExecutor | None = None
        self._last: Future | None = None
        self._leader = topology.dims.leader_of(topology.group_id)

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous of a fresh start (every rank calls it; the leader waits)."""
        present = self.member.join(groups, wait_s) if self.member is not None else 0
        return comm.broadcast_object(present, src=self._leader, group=self.t.exchange_group)

    def exchange(self, local: CompressedLogits | None, e: int, report: dict | None = None) -> ExchangeResult:
        """Blocking swap; `local` None: a round that `peers_ahead` found without peers."""
        return self._swap(local, e, report)

    def start(self, local: CompressedLogits | None, e: int, report: dict | None = None) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-ft-exchange")
        self._last = self._worker.submit(self._swap, local, e, report)
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
        """Finish the rounds in flight and leave (`retire`: for good, with a farewell that
        takes part in the round already agreed to, `LighthouseMember.close`)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.rails is not None:
            self.rails.close(retire=retire)
        elif self.member is not None:
            self.member.close(retire=retire)

    def _swap(self, local: CompressedLogits | None, e: int, report: dict | None) -> ExchangeResult:
        start = time.perf_counter()
        if local is None:
            if self.member is not None:
                self.member.skip_round()
            return ExchangeResult([], [], time.perf_counter() - start, [], 0)
        if self.route == "rails":
            got = self._rails(local, e, report)
        elif self.to_owners:
            got = self._leaders_to_owners(local, e, report)
        else:
            got = self._leaders(local, e, report)
        peers, heads, sent, rejected = got
        self.bytes_sent += sent
        return ExchangeResult(peers, [g for g, _, _ in heads], time.perf_counter() - start, [x for _, x, _ in heads],
                              sent, [r for _, _, r in heads], rejected)

    def _chunks(self, local: CompressedLogits) -> dict[int, CompressedLogits]:
        """`exchange_batch: train`: my predictions on peer h's batch, by h (group order)."""
        peers = [g for g in range(self.t.groups) if g != self.t.group_id]
        rows = local.num_tokens() // len(peers)
        return {h: local.rows(i * rows, (i + 1) * rows) for i, h in enumerate(peers)}

    def _rails(self, local: CompressedLogits, e: int, report: dict | None):
        """My slice (or my chunk for each owner) with rank r of the peers present, then the peers
        every rank of my group received intact. Bytes: what this rank sent, kept peer or not."""
        fmt = local.wire_format()
        if self.to_owners:
            chunks = self._chunks(local)
            out = self.rails.all_to_all(e, {h: pack(c) for h, c in chunks.items()}, report)
            rows = next(iter(chunks.values())).num_tokens()
        else:
            out = self.rails.all_gather(e, pack(local), report)
            rows = local.num_tokens()
        return ([fmt.unpack(p.payload, rows) for p in out.peers], [(p.group, p.exchange, p.report) for p in out.peers],
                out.sent, out.rejected)

    def _leader_round(self, call) -> tuple[list, dict]:
        """On the leader: run `call()` (a Lighthouse round); the header every rank of my group
        gets (`_announce`): who answered intact (group, exchange, report), the frames refused
        by reason, or this job's refusal."""
        header: dict = {"peers": [], "error": None, "rejected": {}}
        got = []
        try:
            got = call()
        except IncompatibleGroup as err:
            header["error"] = err
        for p in got:  # refused by the frame check (tag, length): counted, never unpacked
            if p.problem is not None:
                header["rejected"][p.problem] = header["rejected"].get(p.problem, 0) + 1
        kept = [p for p in got if p.problem is None]
        header["peers"] = [(p.group, p.exchange, p.report) for p in kept]
        return got, header

    def _announce(self, header: dict) -> dict:
        """The leader's header on every rank of my group: one float64 tensor [refused, n,
        rejected by reason..., then per peer: group, exchange, reported loss (NaN: none), step]
        over the exchange's copy of my group (a pickled object costs two broadcasts); the
        refusal's text follows only when there is one. Raises the refusal on every rank."""
        t = self.t
        if t.group_size > 1:
            slots = t.groups - 1  # peers have distinct group ids below codistill.max_groups (the contract)
            r = len(REJECTIONS)
            head = torch.full((2 + r + 4 * slots,), math.nan, dtype=torch.float64)
            error, peers = header["error"], header["peers"]
            head[0], head[1] = float(error is not None), len(peers)
            head[2:2 + r] = torch.tensor([header["rejected"].get(why, 0) for why in REJECTIONS], dtype=torch.float64)
            for i, (g, pe, rep) in enumerate(peers):
                head[2 + r + 4 * i: 2 + r + 4 * i + 4] = torch.tensor(
                    [g, pe, math.nan if rep is None else rep["loss"], -1 if rep is None else rep["step"]],
                    dtype=torch.float64)
            comm.broadcast(head, src=self._leader, group=t.exchange_group)
            if int(head[0]):
                why = comm.broadcast_object((error.field, error.reason) if error else None, src=self._leader,
                                            group=t.exchange_group)
                header["error"] = IncompatibleGroup(*why)
            peers = []
            for i in range(int(head[1])):
                g, pe, loss, step = (float(x) for x in head[2 + r + 4 * i: 2 + r + 4 * i + 4])
                peers.append((int(g), int(pe), None if math.isnan(loss) else {"loss": loss, "step": int(step)}))
            header = {"error": header["error"], "peers": peers,
                      "rejected": {why: int(head[2 + j]) for j, why in enumerate(REJECTIONS) if int(head[2 + j])}}
        if header["error"] is not None:
            raise header["error"]
        return header

    def _leaders_to_owners(self, local: CompressedLogits, e: int, report: dict | None):
        """Gather every rank's chunks on the leader; the leader sends group h the rows of h's
        batch (rank order) and nothing else; scatter rank r its rows from every peer."""
        t, fmt = self.t, local.wire_format()
        chunks = self._chunks(local)
        order, rows = list(chunks), next(iter(chunks.values())).num_tokens()
        n = pack(chunks[order[0]]).numel()
        gathered = comm.gather(torch.cat([pack(chunks[h]) for h in order]), dst=self._leader, group=t.exchange_group)
        header: dict = {"peers": [], "error": None, "rejected": {}}
        kept, sent = [], 0
        if gathered is not None:
            per_rank = [g.split(n) for g in gathered]
            parts = {h: torch.cat([per_rank[r][i] for r in range(t.group_size)]) for i, h in enumerate(order)}
            got, header = self._leader_round(lambda: self.member.round_to_owners(e, parts, report))
            sent = sum(parts[p.group].numel() for p in got)
            kept = [p for p in got if p.problem is None]
        header = self._announce(header)
        k = len(header["peers"])
        if k == 0:
            return [], [], sent, header["rejected"]
        mine = torch.empty(k * n, dtype=torch.uint8)
        scatter = None if gathered is None else [
            torch.cat([p.payload[r * n:(r + 1) * n] for p in kept]) for r in range(t.group_size)]
        comm.scatter(mine, scatter, src=self._leader, group=t.exchange_group)
        return [fmt.unpack(c, rows) for c in mine.split(n)], header["peers"], sent, header["rejected"]

    def _leaders(self, local: CompressedLogits, e: int, report: dict | None):
        t = self.t
        slices = comm.gather(pack(local), dst=self._leader, group=t.exchange_group)
        header: dict = {"peers": [], "error": None, "rejected": {}}
        peers_whole, sent = [], 0
        if slices is not None:
            rows, fmt = local.num_tokens(), local.wire_format()
            whole = _join_slices(slices, rows, local)
            payload = pack(whole)
            got, header = self._leader_round(lambda: self.member.round(e, payload, report))
            sent = payload.numel() * len(got)
            peers_whole = [fmt.unpack(p.payload, whole.num_tokens()) for p in got if p.problem is None]
        header = self._announce(header)
        n = len(header["peers"])
        if n == 0:
            return [], [], sent, header["rejected"]
        mine = torch.empty(n * pack(local).numel(), dtype=torch.uint8)
        parts = None
        if slices is not None:
            rows = local.num_tokens()
            parts = [torch.cat([pack(p.rows(r * rows, (r + 1) * rows)) for p in peers_whole])
                     for r in range(t.group_size)]
        comm.scatter(mine, parts, src=self._leader, group=t.exchange_group)
        size, fmt = mine.numel() // n, local.wire_format()
        peers = [fmt.unpack(mine[i * size:(i + 1) * size], local.num_tokens()) for i in range(n)]
        return peers, header["peers"], sent, header["rejected"]


def _join_slices(slices: list[torch.Tensor], rows: int, like: CompressedLogits) -> CompressedLogits:
    """My group's slices (rank order) as one whole-batch payload, whatever the group's size."""
    fmt = like.wire_format()
    parts = [fmt.unpack(s, rows) for s in slices]
    values = torch.cat([p.values for p in parts])
    indices = None if like.full_vocab else torch.cat([p.indices for p in parts])
    return CompressedLogits(values, indices, like.kind, like.fmt)

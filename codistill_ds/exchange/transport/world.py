"""Swap compressed predictions between codistillation groups: the only cross-group traffic.

Each rank holds the compressed logits of its 1/S slice of the exchange batch and needs, for that
same slice, the logits of every peer group. Two routes deliver exactly the same tensors:

- `leaders` (the sketch of Anil et al. 2018): gather the S slices onto the group leader, swap
  whole-group payloads between the K leaders, scatter each rank its slice of every peer. One
  cross-group link per group; the leader's link carries the group's whole payload.
- `rails`: rank r all-gathers its slice with rank r of every other group. No intra-group
  gather; cross-group traffic is spread over every rank's (every node's) link.

Payloads travel as one flat uint8 tensor per slice (see `compression.pack`), so one collective
moves values and indices together, bit-exactly, in any wire dtype. `bytes_sent` counts what
this rank hands to other groups: the formula `plan.py` states, checked by the tests.

`start` posts an exchange without blocking: one background thread per rank runs exchanges in
submission order over process groups that only the exchange uses (the rail, the leaders group
and a private copy of my group), so training collectives and exchange collectives never share a
group and every rank pairs its exchange collectives in the same order.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.wire import CompressedLogits, pack


class LogitExchange:
    """The `transport: world` transport: route-specific collectives over the process groups
    that `Topology` built in one job. All groups are in lockstep, so every peer predicted on
    the exchange batch I posted."""

    def __init__(self, topology: Topology, route: str, to_owners: bool = False, reports: bool = False) -> None:
        """`to_owners` (exchange_batch "train"): my predictions cover my peers' training batches,
        one chunk per peer in group order, and each chunk goes only to the group that trains on
        it (an all-to-all instead of an all-gather); I receive each peer's predictions on mine.
        `reports` (the peer guard is on, the same in every group of this job): each round also
        all-gathers every group's report (loss, step: 16 bytes, not counted as exchange bytes)
        over my rail, where every rank of a group holds the same logged group mean."""
        if route not in ("leaders", "rails"):
            raise ValueError(f"codistill.route must be 'leaders' or 'rails', got {route!r}")
        self.t, self.route, self.to_owners, self.reports = topology, route, to_owners, reports
        self.bytes_sent = 0
        self._worker: ThreadPoolExecutor | None = None

    def exchange(self, local: CompressedLogits, e: int = 0, report: dict | None = None) -> ExchangeResult:
        """Blocking swap; every rank of every group must call it for the same exchange batch."""
        return self._swap(pack(local), local, report)

    def start(self, local: CompressedLogits, e: int = 0, report: dict | None = None) -> Future:
        """Post the swap and return at once; `.result()` gives the `ExchangeResult`.

        `bytes_sent` grows when the worker hands the payload to the collective, so a reading
        taken while exchanges are in flight lags by those exchanges."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-exchange")
        return self._worker.submit(self._swap, pack(local), local, report)

    def join(self, groups: int, wait_s: float) -> int:
        """Every group is in this job: all are present once the process groups exist."""
        return self.t.groups

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _swap(self, buf: torch.Tensor, local: CompressedLogits, report: dict | None) -> ExchangeResult:
        start, sent_before = time.perf_counter(), self.bytes_sent
        fmt = local.wire_format()
        peer_groups = [g for g in range(self.t.groups) if g != self.t.group_id]
        reports = self._reports(report, peer_groups) if self.reports else None
        if self.to_owners:
            rows = local.num_tokens() // len(peer_groups)
            chunks = [pack(local.rows(i * rows, (i + 1) * rows)) for i in range(len(peer_groups))]
            got = self._rails_to_owners(chunks) if self.route == "rails" else self._leaders_to_owners(chunks)
            peers = [fmt.unpack(got[g], rows) for g in peer_groups]
            return ExchangeResult(peers, peer_groups, time.perf_counter() - start,
                                  bytes_sent=self.bytes_sent - sent_before, peer_reports=reports)
        slices = self._rails(buf) if self.route == "rails" else self._leaders(buf)
        peers = [fmt.unpack(slices[g], local.num_tokens()) for g in peer_groups]
        return ExchangeResult(peers, peer_groups, time.perf_counter() - start,
                              bytes_sent=self.bytes_sent - sent_before, peer_reports=reports)

    def _reports(self, report: dict | None, peer_groups: list[int]) -> list[dict | None]:
        """Every group's {"loss", "step"} over my rail (NaN: nothing logged yet)."""
        mine = torch.tensor([float("nan"), -1.0] if report is None else [report["loss"], report["step"]],
                            dtype=torch.float64)
        every = comm.all_gather(mine, group=self.t.rail)
        return [None if every[g][0].isnan() else {"loss": float(every[g][0]), "step": int(every[g][1])}
                for g in peer_groups]

    def _rails(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """All-gather over my rail: entry g is group g's copy of my slice."""
        out = comm.all_gather(buf, group=self.t.rail)
        self.bytes_sent += buf.numel() * (self.t.groups - 1)
        return out

    def _leaders(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Gather to the leader, swap between leaders, scatter back; entry g is group g's slice."""
        t = self.t
        S, K, n = t.group_size, t.groups, buf.numel()
        leader = t.dims.leader_of(t.group_id)
        gathered = comm.gather(buf, dst=leader, group=t.exchange_group)
        scatter_list = None
        if t.is_leader:
            payload = torch.cat(gathered)  # my group's whole exchange batch, rank order
            everyone = comm.all_gather(payload, group=t.leaders)
            self.bytes_sent += payload.numel() * (K - 1)
            # Rank r receives, for each group g, the r-th slice of g's payload.
            scatter_list = [torch.cat([everyone[g][r * n : (r + 1) * n] for g in range(K)]) for r in range(S)]
        mine = torch.empty(K * n, dtype=buf.dtype, device=buf.device)
        comm.scatter(mine, scatter_list, src=leader, group=t.exchange_group)
        return list(mine.split(n))

    # ---- exchange_batch "train": each prediction goes only to the group that trains on it ------
    def _by_group(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """My chunks (peer order) as one part per group, mine empty."""
        it = iter(chunks)
        empty = chunks[0][:0]
        return [empty if g == self.t.group_id else next(it) for g in range(self.t.groups)]

    def _rails_to_owners(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """All-to-all over my rail: entry g is group g's predictions on my batch slot."""
        got = comm.all_to_all(self._by_group(chunks), group=self.t.rail)
        self.bytes_sent += sum(c.numel() for c in chunks)
        return got

    def _leaders_to_owners(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gather to the leader, all-to-all between leaders (each peer gets its rows of every
        rank's slot), scatter back: entry g is group g's predictions on my batch slot."""
        t = self.t
        S, K, n = t.group_size, t.groups, chunks[0].numel()
        leader = t.dims.leader_of(t.group_id)
        gathered = comm.gather(torch.cat(chunks), dst=leader, group=t.exchange_group)
        scatter_list = None
        if t.is_leader:
            per_rank = [g.split(n) for g in gathered]  # rank r: its chunks, peer order
            to_peer = [torch.cat([per_rank[r][i] for r in range(S)]) for i in range(K - 1)]
            got = comm.all_to_all(self._by_group(to_peer), group=t.leaders)
            self.bytes_sent += sum(p.numel() for p in to_peer)
            scatter_list = [torch.cat([got[g][r * n:(r + 1) * n] for g in range(K) if g != t.group_id])
                            for r in range(S)]
        mine = torch.empty((K - 1) * n, dtype=chunks[0].dtype, device=chunks[0].device)
        comm.scatter(mine, scatter_list, src=leader, group=t.exchange_group)
        parts = iter(mine.split(n))
        return [chunks[0][:0] if g == t.group_id else next(parts) for g in range(K)]

"""Tensor parallelism on the wire: each TP rank sends a distinct 1/T of its rows.

With T > 1 the T ranks of a data rank hold the same teacher payload (the exact top-k from their
vocabulary slices, or the same gathered logits under DeepSpeed AutoTP). Sending it T times would
multiply the cross-group bytes by T; instead TP rank t sends rows chunk t of it over its own rail
(position p = (r*D + d)*T + t talks to position p of every other group, whose chunk t covers the
same rows), and after the swap one all-gather over the TP ranks reassembles each peer's whole
payload. Cross-group bytes then equal the T = 1 formula exactly (docs/design.md, "Model
parallelism inside a group").

The reassembly runs on the exchange's thread (asynchronous swaps), so it uses the exchange's own
copy of the TP group, never the one training's TP collectives run on.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from codistill_ds.exchange.transport.base import ExchangeResult, Transport
from codistill_ds.exchange.vocab import gather_rows, rows_chunk
from codistill_ds.exchange.wire import CompressedLogits


class TensorParallelRows:
    """Wraps the transport of a group with T > 1: rows chunk t out, whole peer payloads back.

    Args:
        inner: the group's transport (world or torchft), which carries the chunks.
        group: the exchange's own process group over my TP ranks.
        tp_rank: my TP rank t.
        tp: T.
    """

    def __init__(self, inner: Transport, group, tp_rank: int, tp: int) -> None:
        self.inner, self.group, self.tp_rank, self.tp = inner, group, tp_rank, tp
        self._worker: ThreadPoolExecutor | None = None

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    def exchange(self, local: CompressedLogits, e: int, report: dict | None = None) -> ExchangeResult:
        chunk = rows_chunk(local, self.tp_rank, self.tp)
        result = self.inner.exchange(chunk, e, report)
        peers = [gather_rows(p, local.num_tokens(), self.group) for p in result.peers]
        return replace(result, peers=peers)

    def start(self, local: CompressedLogits, e: int, report: dict | None = None) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-tp-exchange")
        return self._worker.submit(self.exchange, local, e, report)

    def join(self, groups: int, wait_s: float) -> int:
        return self.inner.join(groups, wait_s)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self.inner.close()

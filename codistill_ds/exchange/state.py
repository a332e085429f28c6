"""The exchange engine's checkpoint state as plain tensors and numbers.

A resumed run must distill at step s on exactly what the uninterrupted run would have: the peer
targets posted before the checkpoint and due after it travel in the checkpoint (completed
first, if a swap was still in flight), with the exchange index, the tokens, the mask and the
positions they cover. Received values and ids are views of one packed wire buffer, so they
are copied out.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from codistill_ds.exchange.batches import ExchangeBatch
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.wire import CompressedLogits, WireFormat


@dataclass
class Pending:
    """An exchange posted at some step, waiting for its consumption step."""

    exchange: int
    batch: ExchangeBatch
    mine: CompressedLogits
    result: ExchangeResult | None = None
    future: Future | None = None


def logits_state(c: CompressedLogits) -> dict:
    fmt = c.wire_format()
    return {"values": c.values.clone(), "kind": c.kind,
            "indices": None if c.indices is None else c.indices.clone(),
            "fmt": [fmt.k, fmt.value_dtype, fmt.index_dtype, fmt.kind, fmt.vocab]}


def logits_from_state(d: dict) -> CompressedLogits:
    fmt = WireFormat(*d["fmt"]) if d.get("fmt") else None
    return CompressedLogits(d["values"], d["indices"], d["kind"], fmt)


def pending_state(p: Pending) -> dict:
    r = p.result
    return {"exchange": p.exchange, "inputs": p.batch.inputs, "mask": p.batch.mask,
            "rows": None if p.batch.rows is None else [p.batch.rows.start, p.batch.rows.stop],
            "positions": p.batch.positions,
            "mine": logits_state(p.mine), "peers": [logits_state(c) for c in r.peers],
            "peer_groups": list(r.peer_groups), "peer_exchanges": r.peer_exchanges, "seconds": r.seconds,
            "peer_reports": r.peer_reports, "rejected": dict(r.rejected)}


def pending_from_state(d: dict) -> Pending:
    result = ExchangeResult([logits_from_state(c) for c in d["peers"]], list(d["peer_groups"]),
                            0.0, d["peer_exchanges"], peer_reports=d.get("peer_reports"),
                            rejected=dict(d.get("rejected", {})))
    rows = None if d.get("rows") is None else range(*d["rows"])
    batch = ExchangeBatch(d["inputs"], d["mask"], rows, d.get("positions"))
    return Pending(d["exchange"], batch, logits_from_state(d["mine"]), result)

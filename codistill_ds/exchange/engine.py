"""The exchange engine: when groups swap predictions, and what each group learns from them.

One object owns the schedule of logit codistillation (Anil et al. 2018, arXiv 1804.03235;
DESIGN.md "Exchange"), whatever loop drives it and whatever carries the bytes:

- every `interval` steps, `post` runs the driver's eval-mode `predict` on exchange batch
  e = step // interval, compresses the logits and hands them to the transport (blocking, or on
  the transport's background thread when `staleness > 0` and `async_exchange`);
- `due(step)` returns the peers' predictions queued for that step (`staleness` steps after
  posting), after waiting for an asynchronous swap, dropping peers whose predictions are not
  finite on some rank of my group, and measuring top-1 agreement with what I sent;
- `distill_loss` turns the student's train-mode logits on those batches into
  1/(#peers) * sum_j D(f_j || f_i).

It is handed its communicators (the transport, my group's process group) like torchft's
`LocalSGD(manager, ...)`: the CLI loop (`loop.py`) and the Hugging Face Trainer integration
(`integrations/hf_trainer.py`) drive the same engine, so async exchange, NaN filtering,
agreement and byte accounting behave the same in both.

Peers may send predictions on a different exchange batch than mine (independent groups
that are not in lockstep, `transport: torchft`): exchange batches are pure functions of e, so
the receiver rebuilds batch e' locally (`batch_for`) and distills on it; only logits cross.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from codistill_ds.distributed import comm
from codistill_ds.exchange.wire import CompressedLogits, compress, wire_dtype
from codistill_ds.config import CodistillConfig
from codistill_ds.exchange.losses import peer_distill_loss, top1_agreement


@dataclass
class ExchangeResult:
    """What one round delivered to this rank: peers' predictions for my slice, group order."""

    peers: list[CompressedLogits]
    peer_groups: list[int]
    seconds: float
    peer_exchanges: list[int] | None = None
    """Exchange index each peer predicted on; None: all on the batch I posted (lockstep)."""
    bytes_sent: int = 0
    """What this rank handed to other groups in this round."""


class Transport(Protocol):
    """Carries one round of compressed predictions between groups (`exchange.py`: one job's
    process groups; `ft_transport.py`: torchft quorums between separate jobs)."""

    bytes_sent: int

    def exchange(self, local: CompressedLogits, e: int) -> ExchangeResult:
        """Blocking swap of my predictions on exchange batch e."""

    def start(self, local: CompressedLogits, e: int) -> Future:
        """Post the swap; `.result()` gives the `ExchangeResult`. Rounds run in posting order."""

    def close(self) -> None: ...


@dataclass
class ExchangeBatch:
    """Model inputs of one exchange batch slice, and which positions count (None: all)."""

    inputs: Any
    """What `predict` and the student take: a token tensor [B, L+1] (CLI) or a dict (HF)."""
    mask: torch.Tensor | None = None
    """[B*L] bool over the prediction rows; padding and ignore_index positions are False."""
    rows: range | None = None
    """Which rows of exchange batch e these are (global, the same numbering in every group):
    the token positions that travel under `token_fraction` are drawn per row."""
    positions: torch.Tensor | None = None
    """[B, m] positions whose predictions travel (None: every position); set by the engine."""


@dataclass
class TargetBatch:
    """Peers' predictions for one exchange batch, due at a step."""

    exchange: int
    inputs: Any
    """Inputs to run the student on; None: the rows are my own first training micro-batch."""
    peers: list[CompressedLogits]
    peer_groups: list[int]
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    """[B, m]: the peers' predictions cover only these positions of each sequence; the student's
    logits are taken at the same ones (`distill_loss`)."""


@dataclass
class Pending:
    """An exchange posted at some step, waiting for its consumption step."""

    exchange: int
    batch: ExchangeBatch
    mine: CompressedLogits
    result: ExchangeResult | None = None
    future: Future | None = None


@dataclass(frozen=True)
class ExchangeSettings:
    """The engine's plain arguments, turned from the config in one place (`from_config`)."""

    interval: int = 1
    staleness: int = 0
    async_exchange: bool = True
    topk: int = 32
    dtype: str = "bf16"
    loss: str = "kl"
    temperature: float = 1.0
    index_dtype: str = "auto"
    token_fraction: float = 1.0
    seed: int = 0
    """Keys the positions drawn under `token_fraction` (with the exchange index and row)."""
    targets: str = "topk"
    """"topk" or "samples" (`sampling.sample_targets`: k ids drawn per position)."""
    peer_weights: tuple[tuple[int, float], ...] = ()
    """(peer group, weight): the distillation term's weighted mean over peers (unlisted: 1)."""

    @classmethod
    def from_config(cls, cd: CodistillConfig, seed: int = 0) -> ExchangeSettings:
        return cls(cd.interval, cd.staleness, cd.async_exchange, cd.topk, cd.dtype, cd.loss, cd.temperature,
                   cd.index_dtype, cd.token_fraction, seed, cd.targets, tuple(tuple(p) for p in cd.peer_weights))

    def weight_of(self, group: int) -> float:
        return dict(self.peer_weights).get(group, 1.0)

    @property
    def kind(self) -> str:
        """MSE matches raw logits; the divergences compare log-probabilities; or sampled ids."""
        if self.targets == "samples":
            return "samples"
        return "logits" if self.loss == "mse" else "logprobs"


@dataclass
class RoundStats:
    """Figures of the latest completed round, for the step's record."""

    agreement: float | None = None
    exchange_ms: float = 0.0
    exchange_compute_ms: float = 0.0
    distill_eval: float | None = None
    peers: int | None = None


Observer = Callable[[str, int, Any], None]
"""`observer(event, step, payload)`: "sent" (my CompressedLogits) or "received" (ExchangeResult)."""


class ExchangeEngine:
    """Schedule, bookkeeping and loss of logit codistillation over a transport."""

    def __init__(self, transport: Transport, settings: ExchangeSettings, group: Any, group_id: int,
                 batch_for: Callable[[int, int], ExchangeBatch], *, on_own_batch: bool = False,
                 leader: bool = True) -> None:
        """`group`: my group's process group (agreement and NaN agreement run over it).
        `batch_for(step, e)`: my slice of exchange batch e (step is -1 when a peer's batch is
        rebuilt). `on_own_batch` (exchange_batch "train"): I predict on my peers' training
        batches and receive their predictions on mine (the transport routes each to its owner),
        so targets cover my own first micro-batch and the student reuses its CE logits; agreement
        is then the driver's (student vs peers), there being no tokens both sides predicted on."""
        self.transport, self.s, self.group, self.group_id = transport, settings, group, group_id
        self.batch_for, self.on_own_batch, self.leader = batch_for, on_own_batch, leader
        self.pending: dict[int, Pending] = {}
        self.skipped_peers = 0
        """Peer predictions dropped for being NaN/Inf (cumulative)."""
        self.stats = RoundStats()
        self.observers: list[Observer] = []
        self._bytes = 0

    # ---- schedule -------------------------------------------------------------------------
    def step(self, step: int, predict: Callable[[Any], torch.Tensor]) -> list[TargetBatch]:
        """Everything a driver calls at the start of an optimizer step: post an exchange if one
        is scheduled, then return the targets due now. `stats` then holds this step's figures."""
        self.stats = RoundStats(peers=self.stats.peers)  # the live peer count carries over
        if self.is_exchange_step(step):
            self.post(step, predict)
        return self.due(step)

    def is_exchange_step(self, step: int) -> bool:
        return step % self.s.interval == 0

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other groups in the rounds completed so far. Counted when a
        round's result is taken (at its consumption step, or when draining), on the main thread,
        so a record's figure does not depend on how far a background swap had got."""
        return self._bytes

    def post(self, step: int, predict: Callable[[Any], torch.Tensor]) -> None:
        """Predict on exchange batch e (the driver's `predict`: eval mode, no grad, [N, V]
        logits), compress, and swap with the peers; the targets are due at step + staleness."""
        s, e = self.s, step // self.s.interval
        batch = self.batch_for(step, e)
        start = time.perf_counter()
        with torch.no_grad():
            logits = predict(batch.inputs)
        logits, batch = self._select(e, batch, logits)
        mine = self._payload(e, logits, batch)
        stats = self.stats
        stats.exchange_compute_ms = (time.perf_counter() - start) * 1e3
        self._notify("sent", step, mine)
        due = step + s.staleness
        if s.staleness > 0 and s.async_exchange:
            future = self.transport.start(mine, e)
            future.add_done_callback(lambda f: f.exception() is None and self._notify("received", step, f.result()))
            self.pending[due] = Pending(e, batch, mine, future=future)
            return
        result = self.transport.exchange(mine, e)
        self._bytes += result.bytes_sent
        self._notify("received", step, result)
        self.pending[due] = Pending(e, batch, mine, result=result)
        stats.exchange_ms = result.seconds * 1e3
        if s.staleness == 0 and not self.on_own_batch:  # fresh targets on the same tokens: log it
            peers = [p for p, pe in zip(result.peers, self._exchanges(result, e)) if pe == e]
            if peers and all(bool(torch.isfinite(p.values.float()).all()) for p in peers):
                stats.distill_eval = peer_distill_loss(logits, peers, s.loss, s.temperature, batch.mask).item()

    def _payload(self, e: int, logits: torch.Tensor, batch: ExchangeBatch) -> CompressedLogits:
        """Top-k (or full) compression, or k draws from the teacher seeded by (seed, exchange, my
        group, my rows), so a resumed run draws the same targets."""
        s = self.s
        if s.targets != "samples":
            return compress(logits, s.topk, wire_dtype(s.dtype), s.kind, s.temperature, s.index_dtype)
        from codistill_ds.exchange.sampling import sample_targets

        gen = torch.Generator(device=logits.device).manual_seed(hash((s.seed, e, self.group_id, batch.rows.start if batch.rows else 0)) & (2**62))
        return sample_targets(logits, s.topk, s.temperature, s.dtype, s.index_dtype, gen)

    def _select(self, e: int, batch: ExchangeBatch, logits: torch.Tensor) -> tuple[torch.Tensor, ExchangeBatch]:
        """Keep the `token_fraction` of positions that travel: the same draw in every group."""
        if self.s.token_fraction >= 1.0 or batch.rows is None:
            return logits, batch
        from codistill_ds.exchange.sampling import gather_positions, select_positions

        b = len(batch.rows)
        length = logits.shape[0] // b
        pos = select_positions(self.s.seed, e, batch.rows, length, self.s.token_fraction)
        mask = None if batch.mask is None else gather_positions(batch.mask.view(b, length), pos)
        return gather_positions(logits.view(b, length, -1), pos), ExchangeBatch(batch.inputs, mask, batch.rows, pos)

    def _rebuild(self, e: int) -> ExchangeBatch:
        """A peer's exchange batch e' rebuilt locally (tokens, mask and positions)."""
        batch = self.batch_for(-1, e)
        if self.s.token_fraction >= 1.0 or batch.rows is None:
            return batch
        from codistill_ds.exchange.sampling import gather_positions, select_positions

        b = len(batch.rows)
        length = batch.mask.numel() // b if batch.mask is not None else _sequence_length(batch.inputs)
        pos = select_positions(self.s.seed, e, batch.rows, length, self.s.token_fraction)
        mask = None if batch.mask is None else gather_positions(batch.mask.view(b, length), pos)
        return ExchangeBatch(batch.inputs, mask, batch.rows, pos)

    def due(self, step: int) -> list[TargetBatch]:
        """The targets to distill on at `step` (empty when none are due or no peer was usable).
        A collective over my group when something is due (NaN check, agreement)."""
        pending = self.pending.pop(step, None)
        if pending is None:
            return []
        if pending.future is not None:
            start = time.perf_counter()
            self._complete(pending)
            self.stats.exchange_ms += (time.perf_counter() - start) * 1e3  # only the unhidden wait
        result = pending.result
        exchanges = self._exchanges(result, pending.exchange)
        keep = self._finite(pending.exchange, result)
        peers = [(p, g, e) for p, g, e, ok in zip(result.peers, result.peer_groups, exchanges, keep)
                 if ok and self.s.weight_of(g) > 0]
        if not self.on_own_batch:
            self.stats.agreement = self._agreement(pending, [p for p, _, e in peers if e == pending.exchange])
        self.stats.peers = len(peers)
        return self._batches(pending, peers)

    def _batches(self, pending: Pending, peers: list[tuple[CompressedLogits, int, int]]) -> list[TargetBatch]:
        """One TargetBatch per exchange index the usable peers predicted on, mine first."""
        out: list[TargetBatch] = []
        for e in sorted({e for _, _, e in peers}, key=lambda x: (x != pending.exchange, x)):
            batch = pending.batch if e == pending.exchange else self._rebuild(e)
            chosen = [(p, g) for p, g, pe in peers if pe == e]
            preds = [p for p, _ in chosen]
            inputs = batch.inputs
            if self.on_own_batch:
                inputs = None
            out.append(TargetBatch(e, inputs, preds, [g for _, g in chosen], batch.mask, batch.positions))
        return out

    def distill_loss(self, students: list[torch.Tensor], batches: list[TargetBatch]) -> torch.Tensor:
        """The (weighted) mean over peers of D(peer || student), the student's logits [N, V] per batch."""
        return batched_peer_loss(students, batches, self.s.loss, self.s.temperature,
                                 self.s.weight_of if self.s.peer_weights else None)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _exchanges(self, result: ExchangeResult, e: int) -> list[int]:
        return result.peer_exchanges if result.peer_exchanges is not None else [e] * len(result.peers)

    def _finite(self, e: int, result: ExchangeResult) -> list[bool]:
        """Drop a peer whose predictions hold NaN/Inf on any rank of my group, this round only."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(p.values.float()).all()) else 1.0 for p in result.peers],
                           dtype=torch.float64)
        if len(result.peers):
            comm.all_reduce(bad, op=comm.ReduceOp.MAX, group=self.group)
        keep = [float(b) == 0.0 for b in bad]
        skipped = len(keep) - sum(keep)
        if skipped:
            self.skipped_peers += skipped
            if self.leader:
                bad_groups = [g for g, ok in zip(result.peer_groups, keep) if not ok]
                print(f"codistill-ds: warning: group {self.group_id} skipped the predictions of peer "
                      f"group(s) {bad_groups} for exchange {e}: they contain NaN/Inf "
                      f"(skipped_peers={self.skipped_peers})", file=sys.stderr, flush=True)
        return keep

    def _agreement(self, pending: Pending, peers: list[CompressedLogits]) -> float | None:
        """Top-1 agreement of my sent predictions with the peers' on the same batch, over my group."""
        mine, mask = pending.mine, pending.batch.mask
        agree, count = 0, 0
        for p in peers:
            same = mine.top1() == p.top1().to(mine.values.device)
            if mask is not None:
                same = same & mask.to(same.device)
            agree += int(same.sum())
            count += int(mask.sum()) if mask is not None else mine.num_tokens()
        total = comm.reduce_numbers([agree, count, len(peers)], group=self.group)
        if total[2] == 0:
            return None
        return total[0] / total[1] if total[1] > 0 else None

    def _notify(self, event: str, step: int, payload: Any) -> None:
        for observer in self.observers:
            observer(event, step, payload)

    def drain(self) -> None:
        """Finish swaps posted for steps past the end, so no collective outlives the run."""
        for pending in self.pending.values():
            if pending.future is not None:
                self._complete(pending)

    def _complete(self, pending: Pending) -> None:
        pending.result, pending.future = pending.future.result(), None
        self._bytes += pending.result.bytes_sent

    def close(self) -> None:
        self.drain()
        self.transport.close()

    # ---- checkpoint state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Targets waiting for their consumption step (in-flight swaps are completed first),
        the byte counter and the skipped-peer count. Plain tensors and numbers only."""
        self.drain()
        pending = {step: _pending_state(p) for step, p in self.pending.items()}
        return {"pending": pending, "bytes_sent": self._bytes, "skipped_peers": self.skipped_peers}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {int(step): _pending_from_state(item) for step, item in state["pending"].items()}
        self._bytes = state["bytes_sent"]
        self.skipped_peers = state["skipped_peers"]


def batched_peer_loss(students: list[torch.Tensor], batches: list[TargetBatch], loss: str,
                      temperature: float, weight_of: Callable[[int], float] | None = None) -> torch.Tensor:
    """(Weighted) mean over every peer of every batch; with one batch and no weights, exactly
    `peer_distill_loss`."""
    if len(students) != len(batches) or not batches:
        raise ValueError(f"need one student logits tensor per target batch, got {len(students)} for {len(batches)}")
    students = [_at_positions(s, b.positions) for s, b in zip(students, batches)]
    weights = [[1.0 if weight_of is None else weight_of(g) for g in b.peer_groups] for b in batches]
    if len(batches) == 1:
        b = batches[0]
        return peer_distill_loss(students[0], b.peers, loss, temperature, _mask_on(b.mask, students[0]),
                                 None if weight_of is None else weights[0])
    total = sum(sum(w) * peer_distill_loss(s, b.peers, loss, temperature, _mask_on(b.mask, s), w)
                for s, b, w in zip(students, batches, weights))
    return total / sum(sum(w) for w in weights)


def student_agreement(students: list[torch.Tensor], batches: list[TargetBatch], group: Any) -> float | None:
    """Top-1 agreement of the student's logits with its peers' predictions on the same tokens,
    over `group` (my group): the measure where my own predictions do not travel (predictions on
    my own training batch, weight exchange). Callers measure it whether or not alpha > 0, so
    independent models (alpha 0) still report how far apart they are."""
    agree, count = 0, 0
    for s, b in zip(students, batches):
        s = _at_positions(s.detach(), b.positions)
        mask = _mask_on(b.mask, s)
        for p in b.peers:
            a, c = top1_agreement(s, p, mask)
            agree, count = agree + a, count + c
    total = comm.reduce_numbers([agree, count], group=group)
    return total[0] / total[1] if total[1] > 0 else None


def _at_positions(student: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The student's [B*L, V] logits at the positions whose predictions travelled."""
    if positions is None:
        return student
    from codistill_ds.exchange.sampling import gather_positions

    b = positions.shape[0]
    return gather_positions(student.view(b, student.shape[0] // b, -1), positions)


def _sequence_length(inputs: Any) -> int:
    """L of the predictions on `inputs`: the CLI's tokens hold L+1 (the last is only a label)."""
    if isinstance(inputs, dict):
        return int(inputs["input_ids"].shape[1])
    return int(inputs.shape[1]) - 1


def _mask_on(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.to(like.device)


def _logits_state(c: CompressedLogits) -> dict:
    """Own copies: received values and indices are views of one packed uint8 wire buffer."""
    fmt = c.wire_format()
    return {"values": c.values.clone(), "kind": c.kind,
            "indices": None if c.indices is None else c.indices.clone(),
            "fmt": [fmt.k, fmt.value_dtype, fmt.index_dtype, fmt.kind]}


def _logits_from_state(d: dict) -> CompressedLogits:
    from codistill_ds.exchange.wire import WireFormat

    fmt = WireFormat(*d["fmt"]) if d.get("fmt") else None
    return CompressedLogits(d["values"], d["indices"], d["kind"], fmt)


def _pending_state(p: Pending) -> dict:
    r = p.result
    return {"exchange": p.exchange, "inputs": p.batch.inputs, "mask": p.batch.mask,
            "rows": None if p.batch.rows is None else [p.batch.rows.start, p.batch.rows.stop],
            "positions": p.batch.positions,
            "mine": _logits_state(p.mine), "peers": [_logits_state(c) for c in r.peers],
            "peer_groups": list(r.peer_groups), "peer_exchanges": r.peer_exchanges, "seconds": r.seconds}


def _pending_from_state(d: dict) -> Pending:
    result = ExchangeResult([_logits_from_state(c) for c in d["peers"]], list(d["peer_groups"]),
                            0.0, d["peer_exchanges"])
    rows = None if d.get("rows") is None else range(*d["rows"])
    batch = ExchangeBatch(d["inputs"], d["mask"], rows, d.get("positions"))
    return Pending(d["exchange"], batch, _logits_from_state(d["mine"]), result)

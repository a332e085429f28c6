"""The exchange engine: when groups swap predictions, and what each group learns from them.

One object owns the schedule of logit codistillation (Anil et al. 2018, arXiv 1804.03235;
docs/design.md "Exchange"), whatever loop drives it and whatever carries the bytes:

- every `interval` steps, `post` runs the driver's eval-mode `predict` on exchange batch
  e = step // interval, compresses the logits and hands them to the transport (blocking, or on
  the transport's background thread when `staleness > 0` and `async_exchange`);
- `due(step)` returns the peers' predictions queued for that step (`staleness` steps after
  posting), after waiting for an asynchronous swap, dropping peers whose predictions are not
  finite on some rank of my group, and measuring top-1 agreement with what I sent;
- `distill_loss` turns the student's train-mode logits on those batches into
  1/(#peers) * sum_j D(f_j || f_i).

It is handed its communicators (the transport, my group's process group) like torchft's
`LocalSGD(manager, ...)`, so a unit test can drive it with a transport of its own. The CLI loop,
the Hugging Face Trainer and the own-Accelerate-loop API all drive it through one
`Distiller` (distiller.py), built in one place (setup.py).

Peers may send predictions on a different exchange batch than mine (independent groups
that are not in lockstep, `transport: torchft`): exchange batches are pure functions of e, so
the receiver rebuilds batch e' locally (`batch_for`) and distills on it; only logits cross.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from codistill_ds.config import CodistillConfig
from codistill_ds.distributed import comm
from codistill_ds.exchange import logits as lg
from codistill_ds.exchange.batches import (
    ExchangeBatch,
    TargetBatch,
    at_positions,
    batched_peer_loss,
    with_positions,
)
from codistill_ds.exchange.sampling import draw_seed
from codistill_ds.exchange.state import Pending, pending_from_state, pending_state
from codistill_ds.exchange.transport.base import ExchangeResult, Transport
from codistill_ds.exchange.wire import CompressedLogits, wire_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
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
    """Keys the positions drawn under `token_fraction` and the sampled targets."""
    targets: str = "topk"
    """"topk" or "samples" (`sampling.sample_targets`: k ids drawn per position)."""
    peer_weights: tuple[tuple[int, float], ...] = ()
    """(peer group, weight): the distillation term's weighted mean over peers (unlisted: 1)."""

    @classmethod
    def from_config(cls, cd: CodistillConfig, seed: int = 0) -> ExchangeSettings:
        return cls(interval=cd.interval, staleness=cd.staleness, async_exchange=cd.async_exchange,
                   topk=cd.topk, dtype=cd.dtype, loss=cd.loss, temperature=cd.temperature,
                   index_dtype=cd.index_dtype, token_fraction=cd.token_fraction, seed=seed,
                   targets=cd.targets, peer_weights=tuple(tuple(p) for p in cd.peer_weights))

    def weight_of(self, group: int) -> float:
        return dict(self.peer_weights).get(group, 1.0)

    @property
    def weights(self) -> Callable[[int], float] | None:
        """`weight_of`, or None when every peer weighs 1 (the plain mean)."""
        return self.weight_of if self.peer_weights else None

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


@dataclass(kw_only=True)
class ExchangeEngine:
    """Schedule, bookkeeping and loss of logit codistillation over a transport.

    Args:
        transport: carries each round between the groups (`transport/`).
        settings: interval, staleness, wire format, loss (`ExchangeSettings.from_config`).
        group: my group's process group (NaN agreement and agreement run over it).
        group_id: my codistillation group.
        batch_for: `batch_for(step, e)` gives my slice of exchange batch e (step is -1 when a
            peer's batch is rebuilt).
        on_own_batch: `exchange_batch: train`: I predict on my peers' training batches and
            receive their predictions on mine (the transport routes each to its owner), so
            targets cover my own first micro-batch and the student reuses its CE logits;
            agreement is then the driver's (student vs peers).
        leader: whether I print my group's warnings.
    """

    transport: Transport
    settings: ExchangeSettings
    group: Any
    group_id: int
    batch_for: Callable[[int, int], ExchangeBatch]
    on_own_batch: bool = False
    leader: bool = True
    pending: dict[int, Pending] = field(default_factory=dict)
    skipped_peers: int = 0
    """Peer predictions dropped for being NaN/Inf (cumulative)."""
    stats: RoundStats = field(default_factory=RoundStats)
    observers: list[Observer] = field(default_factory=list)
    _bytes: int = 0

    @property
    def s(self) -> ExchangeSettings:
        return self.settings

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
        if self._nobody_ahead(step, e):
            return
        batch = self.batch_for(step, e)
        start = time.perf_counter()
        with torch.no_grad():
            logits = predict(batch.inputs)
        batch = with_positions(batch, e, s.seed, s.token_fraction)
        logits = at_positions(logits, batch.positions)
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
                stats.distill_eval = lg.peer_distill_loss(logits, peers, s.loss, s.temperature, batch.mask).item()

    def _nobody_ahead(self, step: int, e: int) -> bool:
        """Ask first, compute after: a transport that knows the next round has no peer (a
        group alone, `transport: torchft`) says so before the teacher forward, which is then
        skipped; the round still runs (without a payload), so the transport stays in step.
        The step's record shows `peers` 0 and `exchange_compute_ms` 0."""
        ahead = getattr(self.transport, "peers_ahead", None)
        if ahead is None or ahead(e, alone=self.stats.peers == 0) != 0:
            return False
        if self.s.staleness > 0 and self.s.async_exchange:
            self.transport.start(None, e)
        else:
            self.transport.exchange(None, e)
        self.stats.peers = 0
        return True

    def _payload(self, e: int, logits: lg.Rows, batch: ExchangeBatch) -> CompressedLogits:
        """Top-k (or full) compression, or k draws from the teacher seeded by (seed, exchange, my
        group, my first row), so every exchange and every group draws anew and a resumed run
        draws the same targets."""
        s = self.s
        if s.targets != "samples":
            return lg.compress(logits, s.topk, wire_dtype(s.dtype), s.kind, s.temperature, s.index_dtype)
        row = batch.rows.start if batch.rows is not None else 0
        device = logits.local.device if isinstance(logits, lg.VocabSlice) else logits.device
        gen = torch.Generator(device=device).manual_seed(draw_seed(s.seed, "samples", e, self.group_id, row))
        return lg.sample_targets(logits, s.topk, s.temperature, s.dtype, s.index_dtype, gen)

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
        """One TargetBatch per exchange index the usable peers predicted on, mine first; a peer's
        batch e' is rebuilt locally (tokens, mask and positions)."""
        out: list[TargetBatch] = []
        for e in sorted({e for _, _, e in peers}, key=lambda x: (x != pending.exchange, x)):
            if e == pending.exchange:
                batch = pending.batch
            else:
                batch = with_positions(self.batch_for(-1, e), e, self.s.seed, self.s.token_fraction)
            chosen = [(p, g) for p, g, pe in peers if pe == e]
            inputs = None if self.on_own_batch else batch.inputs
            out.append(TargetBatch(e, inputs, [p for p, _ in chosen], [g for _, g in chosen], batch.mask,
                                   batch.positions))
        return out

    def distill_loss(self, students: list[torch.Tensor], batches: list[TargetBatch]) -> torch.Tensor:
        """The (weighted) mean over peers of D(peer || student), the student's logits [N, V] per batch."""
        return batched_peer_loss(students, batches, self.s.loss, self.s.temperature, self.s.weights)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _exchanges(self, result: ExchangeResult, e: int) -> list[int]:
        return result.peer_exchanges if result.peer_exchanges is not None else [e] * len(result.peers)

    def _finite(self, e: int, result: ExchangeResult) -> list[bool]:
        """Drop a peer whose predictions hold NaN/Inf on any rank of my group, this round only:
        agreed over the group, so every rank of it distills on the same peers."""
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
                log.warning("group %d skipped the predictions of peer group(s) %s for exchange %d: they "
                            "contain NaN/Inf (skipped_peers=%d)", self.group_id, bad_groups, e, self.skipped_peers)
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

    # ---- checkpoint state (state.py) --------------------------------------------------------
    def state_dict(self) -> dict:
        """Targets waiting for their consumption step (in-flight swaps are completed first),
        the byte counter and the skipped-peer count. Plain tensors and numbers only."""
        self.drain()
        pending = {step: pending_state(p) for step, p in self.pending.items()}
        return {"pending": pending, "bytes_sent": self._bytes, "skipped_peers": self.skipped_peers}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {int(step): pending_from_state(item) for step, item in state["pending"].items()}
        self._bytes = state["bytes_sent"]
        self.skipped_peers = state["skipped_peers"]

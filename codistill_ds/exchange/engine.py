"""The exchange engine: when groups swap predictions, and what each group learns from them.

One object owns the schedule of logit codistillation (Anil et al. 2018, arXiv 1804.03235;
docs/design.md "Exchange"), whatever loop drives it and whatever carries the bytes:

- every `interval` steps, `post` runs the driver's eval-mode `predict` on exchange batch
  e = step // interval, compresses the logits and hands them to the transport (blocking, or on
  the transport's background thread when `staleness > 0` and `async_exchange`);
- `due(step)` returns the peers' predictions queued for that step (`staleness` steps after
  posting), after waiting for an asynchronous swap, dropping peers whose predictions are
  malformed, not finite or (peer guard) far worse than mine on some rank of my group
  (guard.py, counted by reason), and measuring top-1 agreement with what I sent;
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
import math
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
from codistill_ds.exchange.guard import REASONS, check_content, judge, next_tokens
from codistill_ds.exchange.sampling import draw_seed
from codistill_ds.exchange.state import Pending, pending_from_state, pending_state
from codistill_ds.exchange.transport.base import ExchangeResult, Transport
from codistill_ds.exchange.wire import CompressedLogits, wire_dtype

log = logging.getLogger(__name__)

LOSS_EMA = 0.9
"""Weight of the previous value in the moving average of my logged loss that peers see: one
step's loss on a micro-batch is noisy (tiny models: 1.3 to 4.1 around a mean of 2.7), the
average over about ten logged records is what the peers' guard compares."""


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
    peer_guard_ratio: float = 0.0
    """Skip a peer whose reported loss or label NLL exceeds this times mine (guard.py); 0: off."""

    @classmethod
    def from_config(cls, cd: CodistillConfig, seed: int = 0) -> ExchangeSettings:
        return cls(interval=cd.interval, staleness=cd.staleness, async_exchange=cd.async_exchange,
                   topk=cd.topk, dtype=cd.dtype, loss=cd.loss, temperature=cd.temperature,
                   index_dtype=cd.index_dtype, token_fraction=cd.token_fraction, seed=seed,
                   targets=cd.targets, peer_weights=tuple(tuple(p) for p in cd.peer_weights),
                   peer_guard_ratio=cd.peer_guard_ratio)

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
        group: my group's process group (the peer checks and agreement run over it).
        group_id: my codistillation group.
        batch_for: `batch_for(step, e)` gives my slice of exchange batch e (step is -1 when a
            peer's batch is rebuilt; with `on_own_batch` that is my own training batch of
            exchange e, which a peer out of lockstep predicted on).
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
    """Peer predictions dropped (cumulative): NaN/Inf, malformed, unauthenticated, or refused by
    the peer guard; `skipped_reasons` splits the count by reason (guard.REASONS)."""
    skipped_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    loss_report: dict | None = None
    """What my group tells its peers of itself each round: {"loss", "step"} (`note_loss`)."""
    stats: RoundStats = field(default_factory=RoundStats)
    observers: list[Observer] = field(default_factory=list)
    _bytes: int = 0
    _known_vocab: int | None = None
    label_history: dict[int, float] = field(default_factory=dict)
    """Per peer group: the moving average of log(its label NLL / mine) the guard decides on."""

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
        self._known_vocab = mine.wire_format().vocab or self._known_vocab
        stats = self.stats
        stats.exchange_compute_ms = (time.perf_counter() - start) * 1e3
        self._notify("sent", step, mine)
        due = step + s.staleness
        if s.staleness > 0 and s.async_exchange:
            future = self.transport.start(mine, e, self.loss_report)
            future.add_done_callback(lambda f: f.exception() is None and self._notify("received", step, f.result()))
            self.pending[due] = Pending(e, batch, mine, future=future)
            return
        result = self.transport.exchange(mine, e, self.loss_report)
        self._bytes += result.bytes_sent
        self._notify("received", step, result)
        self.pending[due] = Pending(e, batch, mine, result=result)
        stats.exchange_ms = result.seconds * 1e3
        if s.staleness == 0 and not self.on_own_batch:  # fresh targets on the same tokens: log it
            peers = [p for p, pe in zip(result.peers, self._exchanges(result, e)) if pe == e]
            if peers and all(check_content(p, self._vocab(mine)) is None for p in peers):
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
        A collective over my group when something is due (peer checks, agreement)."""
        pending = self.pending.pop(step, None)
        if pending is None:
            return []
        if pending.future is not None:
            start = time.perf_counter()
            self._complete(pending)
            self.stats.exchange_ms += (time.perf_counter() - start) * 1e3  # only the unhidden wait
        result = pending.result
        exchanges = self._exchanges(result, pending.exchange)
        keep = self._usable(pending, result, exchanges)
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
            # My own first micro-batch when the peers predicted on it this step; a peer out of
            # lockstep predicted on my batch of its exchange, rebuilt here (`batch_for(-1, e)`).
            inputs = None if self.on_own_batch and e == pending.exchange else batch.inputs
            out.append(TargetBatch(e, inputs, [p for p, _ in chosen], [g for _, g in chosen], batch.mask,
                                   batch.positions))
        return out

    def distill_loss(self, students: list[torch.Tensor], batches: list[TargetBatch]) -> torch.Tensor:
        """The (weighted) mean over peers of D(peer || student), the student's logits [N, V] per batch."""
        return batched_peer_loss(students, batches, self.s.loss, self.s.temperature, self.s.weights)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _exchanges(self, result: ExchangeResult, e: int) -> list[int]:
        return result.peer_exchanges if result.peer_exchanges is not None else [e] * len(result.peers)

    def note_loss(self, step: int, loss: float) -> None:
        """My group's training loss at `step` (a group mean, the same on every rank: drivers
        call it with each logged record); its moving average travels to the peers each round,
        for their peer guard."""
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return
        prev = self.loss_report["loss"] if self.loss_report else None
        ema = float(loss) if prev is None else LOSS_EMA * prev + (1 - LOSS_EMA) * float(loss)
        self.loss_report = {"loss": ema, "step": int(step)}

    def _vocab(self, mine: CompressedLogits) -> int | None:
        return mine.wire_format().vocab or self._known_vocab

    def _usable(self, pending: Pending, result: ExchangeResult, exchanges: list[int]) -> list[bool]:
        """Which peers' predictions to distill on this round: integrity checks and the peer guard
        (guard.py), agreed over my group so every rank of it uses the same peers; peers the
        transport already refused (bad length, bad tag) are counted here too."""
        s, vocab = self.s, self._vocab(pending.mine)
        labels = None
        if s.peer_guard_ratio > 0 and not self.on_own_batch:
            batches = {pending.exchange: pending.batch}
            for e in set(exchanges) - {pending.exchange}:
                batches[e] = with_positions(self.batch_for(-1, e), e, s.seed, s.token_fraction)
            labels = {e: next_tokens(b.inputs, b.positions, b.mask) for e, b in batches.items()}
        verdict = judge(result.peers, [labels[e] if labels else None for e in exchanges], pending.mine,
                        labels[pending.exchange] if labels else None, vocab, self.group,
                        ratio=s.peer_guard_ratio, reports=result.peer_reports,
                        my_loss=self.loss_report["loss"] if self.loss_report else None,
                        groups=list(result.peer_groups), history=self.label_history)
        for why, count in (result.rejected or {}).items():
            self.skipped_reasons[why] = self.skipped_reasons.get(why, 0) + count
            self.skipped_peers += count
        bad = [(g, why) for g, why in zip(result.peer_groups, verdict.reasons) if why is not None]
        for _, why in bad:
            self.skipped_reasons[why] += 1
        self.skipped_peers += len(bad)
        if bad and self.leader:
            log.warning("group %d skipped the predictions of peer group(s) %s for exchange %d: %s "
                        "(label NLL mine %s, peers %s; skipped_peers=%d)", self.group_id, [g for g, _ in bad],
                        pending.exchange, ", ".join(why for _, why in bad), _fmt(verdict.my_nll),
                        [_fmt(x) for x in verdict.peer_nll or []], self.skipped_peers)
        return [why is None for why in verdict.reasons]

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
        return {"pending": pending, "bytes_sent": self._bytes, "skipped_peers": self.skipped_peers,
                "skipped_reasons": dict(self.skipped_reasons), "loss_report": self.loss_report,
                "label_history": dict(self.label_history)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {int(step): pending_from_state(item) for step, item in state["pending"].items()}
        self._bytes = state["bytes_sent"]
        self.skipped_peers = state["skipped_peers"]
        self.skipped_reasons.update(state.get("skipped_reasons", {}))
        self.loss_report = state.get("loss_report")
        self.label_history = {int(g): float(v) for g, v in state.get("label_history", {}).items()}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"

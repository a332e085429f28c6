"""The codistillation training loop, written once for every backend.

Per optimizer step t of group i (Anil et al. 2018, eq. 1; DESIGN.md):

    loss_i = CE(y, f_i(x)) + alpha(t) * 1/(K-1) * sum_{j != i} D(f_j(x_e) || f_i(x_e))

where x is group i's own training batch and x_e the exchange batch shared by all groups. Every
`interval` steps the groups run x_e in eval mode, compress and swap their predictions
(`exchange.py`); the peers' predictions for exchange e are consumed `staleness` steps later by a
train-mode forward on the same tokens x_e, so the distillation gradient always comes from the
current weights and the (possibly stale) peers only provide targets.

The distillation forward is batched with the first micro-batch of the step (one forward, one
backward), and scaled by the accumulation count because the backend averages micro-steps.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .backends.base import Backend, evaluating
from .compression import CompressedLogits, compress, wire_dtype
from .config import Config
from .data import Corpus, ExchangeStream, TrainStream, val_micro_batches
from .exchange import LogitExchange
from .losses import peer_distill_loss, top1_agreement
from .metrics import MetricsWriter
from .model import set_dropout
from .schedules import alpha_at, lr_at, piecewise_constant
from .topology import Topology


@dataclass
class PendingTargets:
    """Peer predictions for exchange batch e, waiting for their consumption step."""

    exchange: int
    tokens: torch.Tensor | None
    """Tokens to run the student on; None: the targets cover my first training micro-batch."""
    peers: list[CompressedLogits] | None
    """None while an asynchronous exchange is still in flight (see `future`)."""
    future: Future | None = None
    mine: CompressedLogits | None = None
    """My own sent predictions, kept for the agreement metric of an asynchronous exchange."""


@dataclass
class GroupState:
    """Running figures of this group that the end-of-run table reports."""

    last: dict = field(default_factory=dict)
    best_val: float = float("inf")
    val_history: list = field(default_factory=list)


class CodistillLoop:
    """Owns the streams, the exchange and the schedules; the backend owns the sharded replica."""

    def __init__(self, cfg: Config, topology: Topology, backend: Backend, corpus: Corpus,
                 writer: MetricsWriter, device: torch.device) -> None:
        self.cfg, self.t, self.backend, self.writer, self.device = cfg, topology, backend, writer, device
        d, cd = cfg.data, cfg.codistill
        self.train_stream = TrainStream(corpus, cfg.seed, topology.group_id, topology.groups,
                                        topology.group_rank, topology.group_size,
                                        d.micro_batch_size, cfg.train.grad_accum)
        self.codistill = cd.enabled and topology.groups > 1
        ex_batch = d.exchange_batch_size or d.micro_batch_size * topology.group_size
        self.exchange_stream = ExchangeStream(corpus, cfg.seed, ex_batch, topology.group_rank, topology.group_size)
        self.weights = None
        if self.codistill and cd.mode == "weights":
            from .weights import WeightExchange

            self.weights = WeightExchange(topology, backend)
        self.exchange = LogitExchange(topology, cd.route) if self.codistill and not self.weights else None
        self.rail_streams = [
            TrainStream(corpus, cfg.seed, g, topology.groups, topology.group_rank, topology.group_size,
                        d.micro_batch_size, cfg.train.grad_accum)
            for g in range(topology.groups)
        ] if cd.exchange_batch == "train" else []
        self.kind = "logits" if cd.loss == "mse" else "logprobs"
        self.val_batches = val_micro_batches(corpus, topology.group_rank, topology.group_size,
                                             d.micro_batch_size, d.val_batches)
        self.pending: dict[int, PendingTargets] = {}
        self.state = GroupState()
        self.tokens_per_step = self.train_stream.sequences_per_step() * d.seq_len
        self._dropout = None
        self.skipped_peers = 0
        """Peer predictions dropped for being NaN/Inf (health.finite_peers), cumulative."""

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        start = time.perf_counter()
        alpha = self._apply_schedules(step)
        if self.weights is not None:
            ex_stats, target = self._weight_step(step)
        else:
            ex_stats = self._post_exchange(step) if self._is_exchange_step(step) else {}
            target = self.pending.pop(step, None)
        if target is not None and target.future is not None:
            target, ex_stats = self._complete(target, ex_stats)
        A = self.cfg.train.grad_accum
        ce_total, distill_value = 0.0, ex_stats.get("distill_eval")
        for m in range(A):
            batch = self.train_stream.micro_batch(step, m).to(self.device)
            with_distill = m == 0 and target is not None and alpha > 0
            extra = with_distill and target.tokens is not None
            ids = torch.cat([batch, target.tokens.to(self.device)]) if extra else batch
            logits = self.backend.forward(ids[:, :-1])
            n = batch.shape[0]
            ce = F.cross_entropy(logits[:n].flatten(0, 1).float(), batch[:, 1:].flatten())
            loss = ce
            if with_distill:
                student = logits[n:] if extra else logits
                d = peer_distill_loss(student.flatten(0, 1), target.peers, self.cfg.codistill.loss,
                                      self.cfg.codistill.temperature)
                loss = ce + A * alpha * d
                distill_value = d.item()
                if self.weights is not None:
                    ex_stats["agreement"] = self._student_agreement(student.flatten(0, 1), target.peers)
            self.backend.backward(loss)
            self.backend.step()
            ce_total += ce.item()
        return {
            "step": step + 1, "loss": ce_total / A, "distill_loss": distill_value, "alpha": alpha,
            "agreement": ex_stats.get("agreement"), "exchange_ms": ex_stats.get("exchange_ms", 0.0),
            "step_ms": (time.perf_counter() - start) * 1e3,
        }

    def _apply_schedules(self, step: int) -> float:
        o, cd = self.cfg.optim, self.cfg.codistill
        lr = lr_at(step, o.lr, o.warmup_steps, self.cfg.train.steps, o.schedule, o.min_lr)
        self.backend.set_hyperparameters(lr, piecewise_constant(step, o.weight_decay, o.weight_decay_milestones))
        p = piecewise_constant(step, o.dropout, o.dropout_milestones)
        if p != self._dropout:
            set_dropout(self.backend.module, p)
            self._dropout = p
        return alpha_at(step, cd.alpha, cd.burn_in, cd.ramp) if self.codistill else 0.0

    # ---- exchange -----------------------------------------------------------------------
    def _is_exchange_step(self, step: int) -> bool:
        return self.codistill and step % self.cfg.codistill.interval == 0

    def _post_exchange(self, step: int) -> dict:
        """Predict on exchange batch e in eval mode, swap with the peers, queue the targets."""
        cd = self.cfg.codistill
        e = step // cd.interval
        tokens = self._exchange_tokens(step, e)
        with evaluating(self.backend):
            logits = self.backend.forward(tokens[:, :-1].to(self.device)).flatten(0, 1)
        mine = compress(logits, cd.topk, wire_dtype(cd.dtype), self.kind, cd.temperature)
        if cd.staleness > 0 and cd.async_exchange:
            self.pending[step + cd.staleness] = PendingTargets(e, tokens, None, self.exchange.start(mine), mine)
            return {}
        result = self.exchange.exchange(mine)
        self.pending[step + cd.staleness] = self._targets(e, tokens, result.peers)
        stats = {"agreement": self._agreement(mine, result.peers), "exchange_ms": result.seconds * 1e3}
        if cd.staleness == 0:  # fresh targets: the eval-mode divergence is meaningful to log
            with torch.no_grad():
                stats["distill_eval"] = peer_distill_loss(logits, result.peers, cd.loss, cd.temperature).item()
        return stats

    def _weight_step(self, step: int) -> tuple[dict, PendingTargets | None]:
        """Refresh the teachers every `interval` steps; every step, their predictions on my
        first micro-batch become the targets (full vocabulary: the teachers are local)."""
        cd, stats = self.cfg.codistill, {}
        if step % cd.interval == 0:
            stats["exchange_ms"] = self.weights.exchange() * 1e3
        batch = self.train_stream.micro_batch(step, 0).to(self.device)
        preds = self.weights.predictions(batch[:, :-1])
        peers = [compress(p.flatten(0, 1), 0, torch.float32, self.kind, cd.temperature) for p in preds]
        return stats, PendingTargets(step // cd.interval, None, peers)

    def _student_agreement(self, student: torch.Tensor, peers: list[CompressedLogits]) -> float:
        counts = [top1_agreement(student.detach(), p) for p in peers]
        stats = torch.tensor([sum(a for a, _ in counts), sum(c for _, c in counts)], dtype=torch.float64)
        dist.all_reduce(stats, group=self.t.group)
        return (stats[0] / stats[1]).item()

    def _complete(self, target: PendingTargets, ex_stats: dict) -> tuple[PendingTargets, dict]:
        """Wait for an asynchronous exchange at its consumption step; only the wait is charged
        to `exchange_ms`, the part that communication failed to hide behind training."""
        start = time.perf_counter()
        result = target.future.result()
        waited_ms = (time.perf_counter() - start) * 1e3
        stats = dict(ex_stats, agreement=self._agreement(target.mine, result.peers),
                     exchange_ms=ex_stats.get("exchange_ms", 0.0) + waited_ms)
        return self._targets(target.exchange, target.tokens, result.peers), stats

    def _agreement(self, mine: CompressedLogits, peers: list[CompressedLogits]) -> float:
        """Top-1 agreement of my sent predictions with the peers', over my whole group."""
        agree = sum(int((mine.top1() == p.top1()).sum()) for p in peers)
        stats = torch.tensor([agree, mine.num_tokens() * len(peers)], dtype=torch.float64)
        dist.all_reduce(stats, group=self.t.group)
        return (stats[0] / stats[1]).item()

    def _exchange_tokens(self, step: int, e: int) -> torch.Tensor:
        """The exchange slice this rank predicts on, identical across its rail.

        "train": every group's current first micro-batch for my rank slot. Training streams
        are pure functions of (group, step), so each group derives its peers' batches locally
        and still only logits cross groups."""
        if self.cfg.codistill.exchange_batch == "shared":
            return self.exchange_stream.batch_slice(e)
        return torch.cat([s.micro_batch(step, 0) for s in self.rail_streams])

    def _targets(self, e: int, tokens: torch.Tensor, peers: list[CompressedLogits]) -> PendingTargets | None:
        """For "train" exchanges keep only the rows of the peers' predictions on my own batch.
        None when no peer sent finite predictions: that exchange teaches nothing."""
        peers = self._finite_peers(e, peers)
        if not peers:
            return None
        if self.cfg.codistill.exchange_batch == "shared":
            return PendingTargets(e, tokens, peers)
        rows = tokens.shape[0] // self.t.groups * (tokens.shape[1] - 1)
        lo = self.t.group_id * rows
        own = [CompressedLogits(p.values[lo:lo + rows].clone(),
                                None if p.indices is None else p.indices[lo:lo + rows].clone(), p.kind)
               for p in peers]
        return PendingTargets(e, None, own)

    def _finite_peers(self, e: int, peers: list[CompressedLogits]) -> list[CompressedLogits]:
        """Drop a peer whose predictions hold NaN/Inf anywhere in my group, for this exchange only."""
        from .health import finite_peers

        keep = finite_peers(peers, self.t.group)
        skipped = len(peers) - sum(keep)
        if skipped:
            self.skipped_peers += skipped
            if self.t.layout.is_leader:
                others = [g for g in range(self.t.groups) if g != self.t.group_id]
                bad = [g for g, ok in zip(others, keep) if not ok]
                print(f"codistill-ds: warning: group {self.t.group_id} skipped the predictions of "
                      f"peer group(s) {bad} for exchange {e}: they contain NaN/Inf "
                      f"(skipped_peers={self.skipped_peers})", file=sys.stderr, flush=True)
        return [p for p, ok in zip(peers, keep) if ok]

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean next-token loss on the validation windows, identical for every group."""
        total = torch.zeros(2, dtype=torch.float64)
        with evaluating(self.backend):
            for batch in self.val_batches:
                batch = batch.to(self.device)
                logits = self.backend.forward(batch[:, :-1])
                ce = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
                total += torch.tensor([ce.item(), batch[:, 1:].numel()], dtype=torch.float64)
        dist.all_reduce(total, group=self.t.group)
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    # ---- the run --------------------------------------------------------------------------
    def run(self, start_step: int = 0, progress=None, after_step=None) -> GroupState:
        """Steps start_step..train.steps-1; `after_step(steps_done, record)` runs after each
        step's logging (train.py: loss check, watchdog, checkpoints)."""
        tc = self.cfg.train
        for step in range(start_step, tc.steps):
            record = self.train_step(step)
            record.update(group=self.t.group_id, tokens=(step + 1) * self.tokens_per_step,
                          skipped_peers=self.skipped_peers)
            last = step + 1 == tc.steps
            if last:  # exchanges posted past the end complete first: the last record's bytes are final
                self.drain()
            if (tc.eval_interval and (step + 1) % tc.eval_interval == 0) or last:
                record["val_loss"] = self.evaluate()
                self.state.best_val = min(self.state.best_val, record["val_loss"])
                self.state.val_history.append((step + 1, record["val_loss"]))
            if (step + 1) % tc.log_interval == 0 or "val_loss" in record or last:
                self._log(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if after_step is not None:
                after_step(step + 1, record)
        self.drain()
        return self.state

    def cross_group_bytes(self) -> int:
        """Bytes this rank has handed to other groups (logits or weight shards)."""
        sender = self.exchange or self.weights
        return sender.bytes_sent if sender is not None else 0

    def drain(self) -> None:
        """Finish exchanges posted for steps past the end, so no collective outlives the run.
        Idempotent: the last step drains before logging and `run` drains again on the way out."""
        for target in self.pending.values():
            if target is not None and target.future is not None:
                target.future.result()
        if self.exchange is not None:
            self.exchange.close()

    def _log(self, record: dict) -> None:
        """Group means of loss/distill_loss, then one line from the leader."""
        vals = torch.tensor([record["loss"], record["distill_loss"] or 0.0], dtype=torch.float64)
        dist.all_reduce(vals, group=self.t.group)
        record["loss"] = (vals[0] / self.t.group_size).item()
        if record["distill_loss"] is not None:
            record["distill_loss"] = (vals[1] / self.t.group_size).item()
        record["cross_group_bytes"] = self.cross_group_bytes()
        self.state.last = dict(record)
        self.writer.write(record)

    # ---- checkpoint state (checkpoint.py) ------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs besides the step, the engine and the RNG: peer targets
        waiting for their consumption step (in-flight exchanges are waited for), counters and
        the best validation loss. Plain tensors and numbers only. (Weight mode's frozen peer
        copies are not saved: validation refuses checkpoints in that mode.)"""
        pending = {step: _pending_state(target) for step, target in self.pending.items()}
        sender = self.exchange or self.weights
        return {"pending": pending, "bytes_sent": sender.bytes_sent if sender is not None else 0,
                "skipped_peers": self.skipped_peers, "best_val": self.state.best_val,
                "val_history": list(self.state.val_history), "last": dict(self.state.last)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {step: _pending_from_state(item) for step, item in state["pending"].items()}
        sender = self.exchange or self.weights
        if sender is not None:
            sender.bytes_sent = state["bytes_sent"]
        self.skipped_peers = state["skipped_peers"]
        self.state = GroupState(dict(state["last"]), state["best_val"], list(state["val_history"]))


def _logits_state(c: CompressedLogits | None) -> dict | None:
    """Own copies: received values and indices are views of one packed uint8 wire buffer."""
    if c is None:
        return None
    return {"values": c.values.clone(), "kind": c.kind,
            "indices": None if c.indices is None else c.indices.clone()}


def _logits_from_state(d: dict | None) -> CompressedLogits | None:
    return None if d is None else CompressedLogits(d["values"], d["indices"], d["kind"])


def _pending_state(target: PendingTargets | None) -> dict | None:
    """An asynchronous exchange is completed here and kept as what its future returned, so the
    resumed run takes the same `_complete` path (same agreement metric) at the same step."""
    if target is None:
        return None
    item = {"exchange": target.exchange, "tokens": target.tokens, "mine": _logits_state(target.mine),
            "peers": None, "peer_groups": None}
    if target.future is not None:
        result = target.future.result()
        item["peers"], item["peer_groups"] = result.peers, result.peer_groups
    else:
        item["peers"] = target.peers
    item["peers"] = [_logits_state(p) for p in item["peers"]]
    return item


def _pending_from_state(item: dict | None) -> PendingTargets | None:
    from .exchange import ExchangeResult

    if item is None:
        return None
    peers = [_logits_from_state(p) for p in item["peers"]]
    if item["peer_groups"] is None:
        return PendingTargets(item["exchange"], item["tokens"], peers)
    future: Future = Future()
    future.set_result(ExchangeResult(peers, item["peer_groups"], 0.0))
    return PendingTargets(item["exchange"], item["tokens"], None, future, _logits_from_state(item["mine"]))

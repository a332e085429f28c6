"""The codistillation training loop, written once for every backend.

Per optimizer step t of group i (Anil et al. 2018, eq. 1; DESIGN.md):

    loss_i = CE(y, f_i(x)) + alpha(t) * 1/(K-1) * sum_{j != i} D(f_j(x_e) || f_i(x_e))

where x is group i's own training batch and x_e the exchange batch shared by all groups. The
schedule of the swap (every `interval` steps, consumed `staleness` steps later, NaN peers
dropped, agreement measured) is the exchange engine's (`engine.py`), the same object the
Hugging Face Trainer integration drives; this loop supplies the teacher forward (eval mode on
x_e) and the student forward (train mode on the same tokens), so the distillation gradient
always comes from the current weights and the (possibly stale) peers only provide targets.

The distillation forward is batched with the first micro-batch of the step (one forward, one
backward), and scaled by the accumulation count because the backend averages micro-steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from codistill_ds.distributed import comm
from codistill_ds.backends.base import Backend, evaluating
from codistill_ds.exchange.wire import compress
from codistill_ds.config import Config
from codistill_ds.data.streams import Corpus, ExchangeStream, TrainStream, val_micro_batches
from codistill_ds.exchange.engine import (
    ExchangeBatch,
    ExchangeEngine,
    ExchangeSettings,
    TargetBatch,
    Transport,
    batched_peer_loss,
    student_agreement,
)
from codistill_ds.run.metrics import MetricsWriter
from codistill_ds.backends.model import set_dropout
from codistill_ds.schedules import alpha_at, lr_at, piecewise_constant
from codistill_ds.distributed.topology import Topology


@dataclass
class GroupState:
    """Running figures of this group that the end-of-run table reports."""

    last: dict = field(default_factory=dict)
    best_val: float = float("inf")
    val_history: list = field(default_factory=list)


class CodistillLoop:
    """Owns the streams and the schedules and drives the exchange engine; the backend owns the
    sharded replica."""

    def __init__(self, cfg: Config, topology: Topology, backend: Backend, corpus: Corpus,
                 writer: MetricsWriter, device: torch.device, transport: Transport | None = None) -> None:
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
            from codistill_ds.exchange.weights import WeightExchange

            self.weights = WeightExchange(topology, backend)
        self.rail_streams = [
            TrainStream(corpus, cfg.seed, g, topology.groups, topology.group_rank, topology.group_size,
                        d.micro_batch_size, cfg.train.grad_accum)
            for g in range(topology.groups)
        ] if cd.exchange_batch == "train" else []
        self.engine = self._build_engine(transport) if self.codistill and not self.weights else None
        self.kind = "logits" if cd.loss == "mse" else "logprobs"
        self.val_batches = val_micro_batches(corpus, topology.group_rank, topology.group_size,
                                             d.micro_batch_size, d.val_batches)
        self.state = GroupState()
        self.tokens_per_step = self.train_stream.sequences_per_step() * d.seq_len
        self._dropout = None
        self._started = time.perf_counter()

    def _build_engine(self, transport: Transport | None) -> ExchangeEngine:
        """The exchange engine over this job's process groups, unless a transport is handed in
        (`transport: torchft`: groups are separate jobs)."""
        cd = self.cfg.codistill
        if transport is None:
            from codistill_ds.exchange.transport.world import LogitExchange

            transport = LogitExchange(self.t, cd.route, to_owners=cd.exchange_batch == "train")
        return ExchangeEngine(transport, ExchangeSettings.from_config(cd, self.cfg.seed), self.t.group, self.t.group_id,
                              self._exchange_batch, on_own_batch=cd.exchange_batch == "train",
                              leader=self.t.group_rank == 0)

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        start = time.perf_counter()
        alpha = self._apply_schedules(step)
        stats: dict = {}
        if self.weights is not None:
            batches = self._weight_step(step, stats)
        elif self.engine is not None:
            batches = self.engine.step(step, self._predict)
            es = self.engine.stats
            stats = {"agreement": es.agreement, "exchange_ms": es.exchange_ms, "peers": es.peers,
                     "exchange_compute_ms": es.exchange_compute_ms, "distill_eval": es.distill_eval}
        else:
            batches = []
        A = self.cfg.train.grad_accum
        ce_total, distill_value = 0.0, stats.get("distill_eval")
        for m in range(A):
            batch = self.train_stream.micro_batch(step, m).to(self.device)
            with_distill = m == 0 and bool(batches) and alpha > 0
            extra = [b.inputs.to(self.device) for b in batches if b.inputs is not None] if with_distill else []
            ids = torch.cat([batch, *extra]) if extra else batch
            logits = self.backend.forward(ids[:, :-1])
            n = batch.shape[0]
            ce = F.cross_entropy(logits[:n].flatten(0, 1).float(), batch[:, 1:].flatten())
            loss = ce
            if with_distill:
                students = _students(logits, n, batches)
                cd = self.cfg.codistill
                d = batched_peer_loss(students, batches, cd.loss, cd.temperature, self._peer_weight)
                loss = ce + A * alpha * d
                distill_value = d.item()
            if m == 0 and batches and (self.weights is not None or self.cfg.codistill.exchange_batch == "train"):
                # my own predictions did not travel: agreement is the student's, even at alpha 0
                students = _students(logits, n, batches)
                stats["agreement"] = student_agreement(students, batches, self.t.group)
            self.backend.backward(loss)
            self.backend.step()
            ce_total += ce.item()
        now = time.perf_counter()
        return {
            "step": step + 1, "loss": ce_total / A, "distill_loss": distill_value, "alpha": alpha,
            "agreement": stats.get("agreement"), "peers": stats.get("peers"),
            "exchange_ms": stats.get("exchange_ms", 0.0),
            "exchange_compute_ms": stats.get("exchange_compute_ms", 0.0),
            "step_ms": (now - start) * 1e3, "wall_s": now - self._started,
        }

    @property
    def _peer_weight(self):
        """`codistill.peer_weights` as a function of the peer group (None: all peers weigh 1)."""
        weights = dict(self.cfg.codistill.peer_weights)
        return (lambda g: weights.get(g, 1.0)) if weights else None

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
    def _predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher side of an exchange: eval mode (no dropout), no graph, [N, V] logits."""
        with evaluating(self.backend):
            return self.backend.forward(tokens[:, :-1].to(self.device)).flatten(0, 1)

    def _exchange_batch(self, step: int, e: int) -> ExchangeBatch:
        """My slice of exchange batch e, identical across my rail.

        "train": my peers' current first micro-batches for my rank slot, in group order (not
        mine: nobody needs my predictions on my own batch). Training streams are pure functions
        of (group, step), so each group derives its peers' batches locally and still only logits
        cross groups; each prediction goes only to the group that trains on it."""
        if self.cfg.codistill.exchange_batch == "shared":
            ex = self.exchange_stream
            return ExchangeBatch(ex.batch_slice(e), rows=range(ex.rank * ex.slice, (ex.rank + 1) * ex.slice))
        return ExchangeBatch(torch.cat([s.micro_batch(step, 0) for g, s in enumerate(self.rail_streams)
                                        if g != self.t.group_id]))

    def _weight_step(self, step: int, stats: dict) -> list[TargetBatch]:
        """Refresh the teachers every `interval` steps; every step, their predictions on my
        first micro-batch become the targets (full vocabulary: the teachers are local)."""
        cd = self.cfg.codistill
        if step % cd.interval == 0:
            stats["exchange_ms"] = self.weights.exchange() * 1e3
        batch = self.train_stream.micro_batch(step, 0).to(self.device)
        preds = self.weights.predictions(batch[:, :-1])
        peers = [compress(p.flatten(0, 1), 0, torch.float32, self.kind, cd.temperature) for p in preds]
        stats["peers"] = len(peers)
        return [TargetBatch(step // cd.interval, None, peers, list(self.weights.peer_groups))]

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
        comm.all_reduce(total, group=self.t.group)
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    # ---- the run --------------------------------------------------------------------------
    def run(self, start_step: int = 0, progress=None, after_step=None) -> GroupState:
        """Steps start_step..train.steps-1; `after_step(steps_done, record)` runs after each
        step's logging (train.py: loss check, watchdog, checkpoints)."""
        tc = self.cfg.train
        for step in range(start_step, tc.steps):
            record = self.train_step(step)
            record.update(group=self.t.group_id, tokens=(step + 1) * self.tokens_per_step,
                          skipped_peers=self.engine.skipped_peers if self.engine is not None else 0)
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
        self.close()
        return self.state

    def cross_group_bytes(self) -> int:
        """Bytes this rank has handed to other groups (logits or weight shards)."""
        sender = self.engine or self.weights
        return sender.bytes_sent if sender is not None else 0

    def drain(self) -> None:
        """Finish exchanges posted for steps past the end, so no collective outlives the run.
        Idempotent: the last step drains before logging and `run` drains again on the way out."""
        if self.engine is not None:
            self.engine.drain()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def _log(self, record: dict) -> None:
        """Group means of loss/distill_loss, then one line from the leader."""
        vals = torch.tensor([record["loss"], record["distill_loss"] or 0.0], dtype=torch.float64)
        comm.all_reduce(vals, group=self.t.group)
        record["loss"] = (vals[0] / self.t.group_size).item()
        if record["distill_loss"] is not None:
            record["distill_loss"] = (vals[1] / self.t.group_size).item()
        record["cross_group_bytes"] = self.cross_group_bytes()
        self.state.last = dict(record)
        self.writer.write(record)

    # ---- checkpoint state (checkpoint.py) ------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs besides the step, the engine and the RNG: the exchange
        engine's state (peer targets waiting for their consumption step, counters) and the best
        validation loss. Plain tensors and numbers only. (Weight mode's frozen peer copies are
        not saved: validation refuses checkpoints in that mode.)"""
        if self.engine is not None:
            exchange = self.engine.state_dict()
        else:
            exchange = {"pending": {}, "bytes_sent": self.cross_group_bytes(), "skipped_peers": 0}
        return {**exchange, "best_val": self.state.best_val,
                "val_history": list(self.state.val_history), "last": dict(self.state.last)}

    def load_state_dict(self, state: dict) -> None:
        if self.engine is not None:
            self.engine.load_state_dict(state)
        self.state = GroupState(dict(state["last"]), state["best_val"], list(state["val_history"]))


def _students(logits: torch.Tensor, n: int, batches: list[TargetBatch]) -> list[torch.Tensor]:
    """The student's [N, V] logits for each target batch: rows of my own micro-batch (inputs
    None) or of the exchange tokens appended after it, in order."""
    out, offset = [], n
    for b in batches:
        if b.inputs is None:
            out.append(logits[:n].flatten(0, 1))
        else:
            k = b.inputs.shape[0]
            out.append(logits[offset:offset + k].flatten(0, 1))
            offset += k
    return out

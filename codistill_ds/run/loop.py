"""The codistillation training loop, written once for every backend.

Per optimizer step t of group i (Anil et al. 2018, eq. 1; docs/design.md):

    loss_i = CE(y, f_i(x)) + alpha(t) * 1/(K-1) * sum_{j != i} D(f_j(x_e) || f_i(x_e))

where x is group i's own training batch and x_e the exchange batch shared by all groups. The
schedule of the swap (every `interval` steps, consumed `staleness` steps later, NaN peers
dropped, agreement measured) is the `Distiller`'s (exchange/distiller.py), the same object the
Hugging Face Trainer and the own-loop API drive; this loop supplies the teacher forward (eval
mode on x_e) and the student forward (train mode on the same tokens), so the distillation
gradient always comes from the current weights and the (possibly stale) peers only provide
targets.

The distillation forward is batched with the first micro-batch of the step (one forward, one
backward), and scaled by the accumulation count because the backend averages micro-steps.

Hooks (`LoopHooks`) let a caller watch or extend the run without replacing a method: the CLI
job's loss check, watchdog and checkpoints, a benchmark's timers and byte counters, DiLoCo's
extra figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from codistill_ds.backends.base import Backend, evaluating
from codistill_ds.backends.model import set_dropout
from codistill_ds.config import Config
from codistill_ds.data.corpus import Corpus
from codistill_ds.data.streams import ExchangeStream, TrainStream, val_micro_batches
from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange import logits as lg
from codistill_ds.exchange.batches import (
    ExchangeBatch,
    TargetBatch,
    own_rows,
    student_agreement,
    students_of,
)
from codistill_ds.exchange.distiller import Distiller
from codistill_ds.exchange.engine import ExchangeSettings
from codistill_ds.exchange.setup import build_engine, build_transport
from codistill_ds.exchange.transport.base import Transport
from codistill_ds.run.metrics import MetricsWriter
from codistill_ds.schedules import lr_at, piecewise_constant


@dataclass
class GroupState:
    """Running figures of this group that the end-of-run table reports."""

    last: dict = field(default_factory=dict)
    best_val: float = float("inf")
    val_history: list = field(default_factory=list)


class LoopHooks:
    """Points where a caller joins the loop; every method is optional (a no-op here).

    Order per step: `on_step_start(loop, step)`, the step, `on_step_end(loop, step, record)`
    (the record may gain fields), evaluation when due, `on_record(loop, record)` just before a
    record is written (every field final: losses as group means, bytes), then
    `after_step(loop, steps_done, record)` (checkpoints, watchdog: after logging)."""

    def on_run_start(self, loop: CodistillLoop, start_step: int) -> None: ...

    def on_step_start(self, loop: CodistillLoop, step: int) -> None: ...

    def on_step_end(self, loop: CodistillLoop, step: int, record: dict) -> None: ...

    def on_record(self, loop: CodistillLoop, record: dict) -> None: ...

    def after_step(self, loop: CodistillLoop, steps_done: int, record: dict) -> None: ...

    def on_run_end(self, loop: CodistillLoop, state: GroupState) -> None: ...


class Teachers:
    """Peers whose predictions are computed here, not exchanged: weight exchange's frozen
    copies (`exchange/weights.py`) or a benchmark's offline teacher. `refresh(step)` returns
    the milliseconds a refresh took (None when nothing was refreshed)."""

    peer_groups: list[int]
    bytes_sent: int

    def refresh(self, step: int) -> float | None: ...

    def targets(self, input_ids: torch.Tensor) -> list: ...


class CodistillLoop:
    """Owns the streams and the schedules and drives the `Distiller`; the backend owns the
    sharded replica.

    Args:
        cfg: the run's config.
        topology: the job's axes and process groups.
        backend: the sharded replica (`backends/`).
        corpus: token windows (`data/`).
        writer: metrics.jsonl (and dashboards) of my group's leader.
        device: where batches go.
        transport: the cross-group transport; None builds `transport: world`'s.
        hooks: `LoopHooks` to call, in order.
        teachers: local teachers instead of an exchange (weight exchange, or a benchmark's).
    """

    def __init__(self, cfg: Config, topology: Topology, backend: Backend, corpus: Corpus,
                 writer: MetricsWriter, device: torch.device, transport: Transport | None = None,
                 hooks: Sequence[LoopHooks] = (), teachers: Teachers | None = None) -> None:
        self.cfg, self.t, self.backend, self.writer, self.device = cfg, topology, backend, writer, device
        self.hooks = list(hooks)
        d, cd = cfg.data, cfg.codistill
        t = topology
        self.train_stream = TrainStream(corpus, cfg.seed, t.group_id, t.groups, t.data_rank, t.data_size,
                                        d.micro_batch_size, cfg.train.grad_accum)
        self.codistill = (cd.enabled and t.groups > 1) or teachers is not None
        ex_batch = d.exchange_batch_size or d.micro_batch_size * t.data_size
        self.exchange_stream = ExchangeStream(corpus, cfg.seed, ex_batch, t.data_rank, t.data_size)
        if teachers is None and self.codistill and cd.mode == "weights":
            from codistill_ds.exchange.weights import WeightExchange

            teachers = WeightExchange(t, backend, cd.interval, ExchangeSettings.from_config(cd, cfg.seed),
                                      stale=cd.stale_teachers)
        self.teachers = teachers
        self.rail_streams = [
            TrainStream(corpus, cfg.seed, g, t.groups, t.data_rank, t.data_size, d.micro_batch_size,
                        cfg.train.grad_accum)
            for g in range(t.groups)
        ] if cd.exchange_batch == "train" else []
        engine = None
        if self.codistill and teachers is None:
            transport = transport or build_transport(cd, t)
            engine = build_engine(cd, t, transport, self._exchange_batch, cfg.seed)
        self.distiller = Distiller(cd, engine, cfg.seed)
        self.val_batches = val_micro_batches(corpus, t.data_rank, t.data_size, d.micro_batch_size, d.val_batches)
        self.state = GroupState()
        self.tokens_per_step = self.train_stream.sequences_per_step() * d.seq_len
        self._dropout = None
        self._stop = False
        self._started = time.perf_counter()

    @property
    def engine(self):
        """The exchange engine (None without codistillation, or with local teachers)."""
        return self.distiller.engine

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        self._apply_schedules(step)
        dist = self.distiller
        refresh_ms = None
        if self.teachers is not None:
            dist.begin(step, None)
            refresh_ms = self.teachers.refresh(step)
            batches = self._teacher_targets(step)
        elif dist.engine is not None:
            batches = dist.begin(step, self._predict)
        else:
            batches = []
        if not self.codistill:
            dist.alpha = 0.0
        A = self.cfg.train.grad_accum
        ce_total = 0.0
        for m in range(A):
            batch = self.train_stream.micro_batch(step, m).to(self.device)
            with_distill = m == 0 and bool(batches) and dist.alpha > 0
            extra = [b.inputs.to(self.device) for b in batches if b.inputs is not None] if with_distill else []
            ids = torch.cat([batch, *extra]) if extra else batch
            rows = lg.as_rows(self.backend.forward(ids[:, :-1]))
            n, length = batch.shape[0], batch.shape[1] - 1
            ce = lg.cross_entropy(lg.take(rows, 0, n * length), batch[:, 1:].flatten())
            loss = ce
            if m == 0 and batches:
                students = students_of(rows, n, length, batches)
                if with_distill:
                    loss = ce + A * dist.loss(students, batches)
                if self.teachers is not None or self.cfg.codistill.exchange_batch == "train":
                    # my own predictions did not travel: agreement is the student's, even at alpha 0
                    dist.agree(student_agreement(students, batches, self.t.group))
            self.backend.backward(loss)
            self.backend.step()
            ce_total += ce.item()
        now = time.perf_counter()
        figures = dist.figures()
        if self.teachers is not None:
            figures.update(peers=len(batches[0].peers) if batches else 0, exchange_ms=refresh_ms or 0.0)
        return {"step": step + 1, "loss": ce_total / A, **{k: figures[k] for k in (
                    "distill_loss", "alpha", "agreement", "peers", "exchange_ms", "exchange_compute_ms")},
                "step_ms": (now - start) * 1e3, "cpu_ms": (time.process_time() - cpu_start) * 1e3,
                "wall_s": now - self._started}

    def _apply_schedules(self, step: int) -> None:
        o = self.cfg.optim
        lr = lr_at(step, o.lr, o.warmup_steps, self.cfg.train.steps, o.schedule, o.min_lr)
        self.backend.set_hyperparameters(lr, piecewise_constant(step, o.weight_decay, o.weight_decay_milestones))
        p = piecewise_constant(step, o.dropout, o.dropout_milestones)
        if p != self._dropout:
            set_dropout(self.backend.module, p)
            self._dropout = p

    # ---- exchange -----------------------------------------------------------------------
    def _predict(self, tokens: torch.Tensor) -> lg.Rows:
        """The teacher side of an exchange: eval mode (no dropout), no graph, [N, V] logits (or
        this rank's vocabulary slice of them)."""
        with evaluating(self.backend):
            return lg.as_rows(self.backend.forward(tokens[:, :-1].to(self.device)))

    def _exchange_batch(self, step: int, e: int) -> ExchangeBatch:
        """My slice of exchange batch e, identical across my rail.

        "train": my peers' current first micro-batches for my data rank, in group order (not
        mine: nobody needs my predictions on my own batch); under `token_fraction` f < 1 only
        their first ceil(f x b) sequences (`own_rows`), so the teacher forward shrinks by f.
        Training streams are pure functions of (group, step), so each group derives its peers'
        batches locally and still only logits cross groups; each prediction goes only to the group
        that trains on it. Step -1 (the engine rebuilds what a peer out of lockstep predicted on,
        at its exchange e): my own first micro-batch of exchange step e x interval (its first
        rows), the batch that peer derived for me."""
        if self.cfg.codistill.exchange_batch == "shared":
            ex = self.exchange_stream
            return ExchangeBatch(ex.batch_slice(e), rows=range(ex.rank * ex.slice, (ex.rank + 1) * ex.slice))
        rows = own_rows(self.cfg.data.micro_batch_size, self.cfg.codistill.token_fraction)
        if step < 0:
            return ExchangeBatch(self.train_stream.micro_batch(e * self.cfg.codistill.interval, 0)[:rows])
        return ExchangeBatch(torch.cat([s.micro_batch(step, 0)[:rows] for g, s in enumerate(self.rail_streams)
                                        if g != self.t.group_id]))

    def _teacher_targets(self, step: int) -> list[TargetBatch]:
        """Every step, the local teachers' predictions on my first micro-batch become the targets."""
        batch = self.train_stream.micro_batch(step, 0).to(self.device)
        peers = self.teachers.targets(batch[:, :-1])
        interval = max(1, self.cfg.codistill.interval)
        return [TargetBatch(step // interval, None, peers, list(self.teachers.peer_groups))] if peers else []

    # ---- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean next-token loss on the validation windows, identical for every group."""
        total = torch.zeros(2, dtype=torch.float64)
        with evaluating(self.backend):
            for batch in self.val_batches:
                batch = batch.to(self.device)
                rows = lg.as_rows(self.backend.forward(batch[:, :-1]))
                ce = lg.cross_entropy(rows, batch[:, 1:].flatten(), reduction="sum")
                total += torch.tensor([ce.item(), batch[:, 1:].numel()], dtype=torch.float64)
        comm.all_reduce(total, group=self.t.group)
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    # ---- the run --------------------------------------------------------------------------
    def run(self, start_step: int = 0, progress=None,
            after_step: Callable[[int, dict], None] | None = None) -> GroupState:
        """Steps start_step..train.steps-1, calling the hooks; `after_step(steps_done, record)` is
        a shorthand for a hook's `after_step`."""
        tc = self.cfg.train
        self._call("on_run_start", start_step)
        for step in range(start_step, tc.steps):
            self._call("on_step_start", step)
            record = self.train_step(step)
            figures = self.distiller.figures()
            record.update(group=self.t.group_id, tokens=(step + 1) * self.tokens_per_step,
                          skipped_peers=figures["skipped_peers"], skipped_reasons=figures["skipped_reasons"])
            self._call("on_step_end", step, record)
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
            self._call("after_step", step + 1, record)
            if after_step is not None:
                after_step(step + 1, record)
            if self._stop:
                break
        self.close()
        self._call("on_run_end", self.state)
        return self.state

    def request_stop(self) -> None:
        """End the run after the current step (a hook's early stop: a benchmark's stop rule)."""
        self._stop = True

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    def cross_group_bytes(self) -> int:
        """Bytes this rank has handed to other groups (logits or weight shards)."""
        if self.teachers is not None:
            return self.teachers.bytes_sent
        return self.distiller.bytes_sent

    def drain(self) -> None:
        """Finish exchanges posted for steps past the end, so no collective outlives the run.
        Idempotent: the last step drains before logging and `run` drains again on the way out."""
        if self.engine is not None:
            self.engine.drain()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if hasattr(self.teachers, "close"):  # a torchft membership of weight exchange
            self.teachers.close()

    def _log(self, record: dict) -> None:
        """Group means of loss/distill_loss, the group's CPU time of the step (the sum over its
        ranks: what the step cost, whatever waited on whom), then one line from the leader."""
        vals = torch.tensor([record["loss"], record["distill_loss"] or 0.0, record.get("cpu_ms", 0.0)],
                            dtype=torch.float64)
        comm.all_reduce(vals, group=self.t.group)
        record["loss"] = (vals[0] / self.t.group_size).item()
        if "cpu_ms" in record:
            record["cpu_ms"] = vals[2].item()
        if record["distill_loss"] is not None:
            record["distill_loss"] = (vals[1] / self.t.group_size).item()
        record["cross_group_bytes"] = self.cross_group_bytes()
        if self.engine is not None:  # the group's loss, as the peers' guard sees it (a group mean)
            self.engine.note_loss(record["step"], record["loss"])
        self._call("on_record", record)
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

"""Rank program: tests/workers/ckpt_run.py (the CLI's `run` with its recorders and faults) plus
probes inside the exchange, each recomputing what the run did another way. Args: as ckpt_run
(OUT CONFIG [overrides...]). Writes OUT/probe_rank{r}.json at the end of the run:

  swaps  one entry per transport swap (either transport): whether it ran on the main thread
  due    per step and target batch: the exchange index, the global rows of my slice, the
         positions that travelled, the peer groups, a digest of its tokens; with PROBE_FORWARD=1 also the largest
         |student rows the loop cut from its batched forward - a forward of that batch alone|
         (the same weights, train mode, no graph)
  terms  per distilling step: the loop's D and the same term rebuilt by hand: the student
         gathered position by position by indexing, each peer's D alone (`distill_loss`, one
         peer, checked against float64 in tests/unit/test_losses.py), the mean over peers and
         batches weighted by the config's `codistill.peer_weights` (unlisted: 1)
         and the student's top-1 agreement with each peer counted by hand (agree, count)
  agreement  every agreement the driver measured itself (`Distiller.agree`: exchange_batch
         "train", weight exchange)
  sent   per posting step (exchange_batch "train"): whether my teacher predicted on exactly my
         peers' first micro-batches of the step, in group order, rebuilt from a corpus and
         streams built here

Several runs in one launch (`@NAME ...`, tests/workers/runs.py): each run's probes start
empty and go to OUT/NAME/probe_rank{r}.json.

PROBE_FAULT (env) nanrank:R:S: rank R alone (not its whole group, unlike ckpt_run's nanlogits)
sends NaN predictions at step index S, so the rest of its group sends finite ones.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading

import ckpt_run
import torch

from codistill_ds.exchange.losses import distill_loss
from runs import is_multi

PROBE: dict = {"swaps": [], "due": [], "terms": [], "sent": [], "agreement": []}
FORWARD = os.environ.get("PROBE_FORWARD") == "1"


def digest(t: torch.Tensor) -> str:
    return ckpt_run.digest(t.cpu())


def job():
    return ckpt_run.JOBS[-1]


def rows_of(e: int) -> list[int] | None:
    rows = job().loop._exchange_batch(-1, e).rows if job().cfg.codistill.exchange_batch == "shared" else None
    return None if rows is None else [rows.start, rows.stop]


def at_positions_by_hand(student: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return student
    b = positions.shape[0]
    length = student.shape[0] // b
    return torch.stack([student[i * length + int(p)] for i in range(b) for p in positions[i]])


def hand_term(students: list[torch.Tensor], due: list) -> tuple[float, list]:
    """The weighted mean over every peer of every batch, and each (batch, peer group, D) alone."""
    cd = job().cfg.codistill
    weight = {int(g): float(w) for g, w in cd.peer_weights}
    num = den = 0.0
    each = []
    for i, (student, batch) in enumerate(zip(students, due)):
        s = at_positions_by_hand(student.detach().float(), batch.positions)
        mask = None if batch.mask is None else batch.mask.to(s.device)
        for peer, g in zip(batch.peers, batch.peer_groups):
            w = weight.get(int(g), 1.0)
            d = distill_loss(s, peer, cd.loss, cd.temperature, mask).item()
            num, den = num + w * d, den + w
            each.append([i, int(g), d])
    return num / den, each


@torch.no_grad()
def forward_gap(step: int, students: list[torch.Tensor], due: list) -> float:
    """The loop ran one forward on [my micro-batch; batch e; batch e'; ...] and cut each target
    batch's rows out; here each batch is run alone."""
    loop = job().loop
    worst = 0.0
    for student, batch in zip(students, due):
        tokens = loop.train_stream.micro_batch(step, 0) if batch.inputs is None else batch.inputs
        tokens = tokens[: student.shape[0] // (tokens.shape[1] - 1)]  # token_fraction: the first rows
        alone = loop.backend.forward(tokens[:, :-1].to(loop.device)).flatten(0, 1).float()
        worst = max(worst, (alone - student.detach().float()).abs().max().item())
    return worst


def reset(out) -> None:
    for entries in PROBE.values():
        entries.clear()
    if is_multi(sys.argv):
        os.environ["PROBE_DIR"] = str(out)


def install() -> None:
    ckpt_run.RESETS.append(reset)
    from codistill_ds.exchange.distiller import Distiller
    from codistill_ds.exchange.transport.ft import TorchFTTransport
    from codistill_ds.exchange.transport.world import LogitExchange

    for cls in (LogitExchange, TorchFTTransport):
        def swap(self, *args, _orig=cls._swap):
            PROBE["swaps"].append({"main": threading.current_thread() is threading.main_thread()})
            return _orig(self, *args)

        cls._swap = swap

    begin, loss = Distiller.begin, Distiller.loss

    def probe_begin(self, step, predict):
        self._probe_step = step
        if predict is not None and job().cfg.codistill.exchange_batch == "train":
            predict = sent_probe(step, predict)
        due = begin(self, step, predict)
        for b in due:
            PROBE["due"].append({"step": step, "exchange": b.exchange, "rows": rows_of(b.exchange),
                                 "positions": None if b.positions is None else b.positions.tolist(),
                                 "peer_groups": list(b.peer_groups), "own": b.inputs is None,
                                 "inputs": None if b.inputs is None else digest(b.inputs)})
        return due

    def probe_loss(self, students, due):
        out = loss(self, students, due)
        if out is not None:
            ref, each = hand_term(students, due)
            term = {"step": self._probe_step, "got": self.step_distill, "ref": ref, "each": each,
                    "batches": len(due), "agree_count": hand_agreement(students, due)}
            if FORWARD:
                term["forward_gap"] = forward_gap(self._probe_step, students, due)
            PROBE["terms"].append(term)
        return out

    agree = Distiller.agree

    def probe_agree(self, agreement):
        PROBE["agreement"].append({"step": self._probe_step, "value": agreement})
        return agree(self, agreement)

    Distiller.begin, Distiller.loss, Distiller.agree = probe_begin, probe_loss, probe_agree

    faults = [item.split(":") for item in filter(None, os.environ.get("PROBE_FAULT", "").split(","))]
    nan_at = {int(s) for kind, r, s in faults if kind == "nanrank" and int(r) == int(os.environ.get("RANK", "0"))}
    if nan_at:
        build = ckpt_run.train.build_job

        def build_job(cfg, hooks=()):
            built = build(cfg, hooks)
            backend = built.backend
            forward = backend.forward

            def fwd(ids):
                logits = forward(ids)
                return logits * float("nan") if not backend.module.training and ckpt_run.STEP[0] in nan_at else logits

            backend.forward = fwd
            return built

        ckpt_run.train.build_job = build_job

    run = ckpt_run.train.run

    def run_and_write(cfg, hooks=()):
        from codistill_ds.run.loop import LoopHooks

        class Write(LoopHooks):
            def on_run_end(self, loop, state) -> None:
                out = os.path.join(os.environ["PROBE_DIR"], f"probe_rank{loop.t.rank}.json")
                with open(out, "w") as f:
                    json.dump(PROBE, f)

        return run(cfg, [*hooks, Write()])

    ckpt_run.train.run = run_and_write


_CORPUS: list = []


def sent_probe(step: int, predict):
    """exchange_batch "train": what my teacher predicts on must be each peer's first micro-batch
    of this step (its first ceil(f b) sequences under token_fraction f), in group order: rebuilt
    here from a corpus and streams of this probe's own."""
    from codistill_ds.data.corpus import build_corpus
    from codistill_ds.data.streams import TrainStream

    loop, cfg = job().loop, job().cfg
    t = loop.t
    if not _CORPUS:
        _CORPUS.append(build_corpus(cfg.data))

    def wrapped(tokens):
        peers = [g for g in range(t.groups) if g != t.group_id]
        rows = math.ceil(cfg.codistill.token_fraction * cfg.data.micro_batch_size - 1e-9)
        want = torch.cat([TrainStream(_CORPUS[0], cfg.seed, g, t.groups, t.data_rank, t.data_size,
                                      cfg.data.micro_batch_size, cfg.train.grad_accum).micro_batch(step, 0)[:rows]
                          for g in peers])
        PROBE["sent"].append({"step": step, "same_tokens": bool(torch.equal(tokens.cpu(), want))})
        return predict(tokens)

    return wrapped


def hand_agreement(students: list[torch.Tensor], due: list) -> tuple[int, int]:
    """Top-1 of the student against each peer's sent top-1, over counted positions."""
    agree = count = 0
    for student, batch in zip(students, due):
        s = at_positions_by_hand(student.detach().float(), batch.positions)
        for peer in batch.peers:
            best = peer.values.float().argmax(-1)
            top = best if peer.indices is None else peer.indices[torch.arange(len(best)), best]
            same = s.argmax(-1).cpu() == top.long().cpu()
            keep = torch.ones_like(same) if batch.mask is None else batch.mask.cpu()
            agree, count = agree + int((same & keep).sum()), count + int(keep.sum())
    return agree, count


if __name__ == "__main__":
    os.environ.setdefault("PROBE_DIR", sys.argv[1])
    install()
    ckpt_run.main()

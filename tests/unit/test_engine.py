"""The exchange engine on its own, driven through a transport written here.

The engine is handed its communicators (docs/design.md, "Exchange"), so it runs in one process:
the "peers" are tiny fixed models (an embedding table each) whose payloads the transport
computes itself on the same exchange tokens. Every figure the engine produces is checked
against the same thing computed another way: targets due at the right step on the right batch,
the loss against `peer_distill_loss` on hand-built payloads, NaN peers dropped and counted,
peers on another exchange batch distilled on the rebuilt batch, sampled targets drawn anew per
exchange and per group but identical for a resumed run, positions under `token_fraction`,
bytes, asynchronous swaps equal to blocking ones, and checkpoint state round trips.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.distributed as dist

from codistill_ds.config import CodistillConfig
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.exchange.batches import ExchangeBatch, TargetBatch, students_of
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.exchange.losses import distill_loss, peer_distill_loss
from codistill_ds.exchange.sampling import (
    gather_positions,
    sample_targets,
    select_positions,
)
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.wire import CompressedLogits, compress, pack, wire_dtype

V, B, L = 40, 3, 6


pytestmark = pytest.mark.usefixtures("one_rank_world")  # tests/unit/conftest.py


def tokens(e: int, rows: range) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + e)
    return torch.randint(0, V, (100, L + 1), generator=g)[rows.start:rows.stop]


def batch_for(step: int, e: int) -> ExchangeBatch:
    rows = range(B)
    return ExchangeBatch(tokens(e, rows), rows=rows)


def table(group: int) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(group))


def model(group: int):
    """Group g's 'model': logits = W_g[token], [B*L, V]."""
    w = table(group)
    return lambda ids: w[ids[:, :-1]].flatten(0, 1)


class PeerTransport:
    """The peers' payloads computed here, each on the exchange batch it was asked about (or on
    `lag[g]` batches earlier, a peer out of lockstep); `poison` groups send NaN."""

    def __init__(self, settings: ExchangeSettings, peers: list[int], lag: dict[int, int] | None = None,
                 poison: tuple[int, ...] = ()) -> None:
        self.s, self.peers, self.lag, self.poison = settings, peers, lag or {}, poison
        self.bytes_sent, self.calls = 0, []
        self._pool = ThreadPoolExecutor(1)

    def payload(self, g: int, e: int) -> CompressedLogits:
        logits = model(g)(batch_for(-1, e).inputs)
        if self.s.token_fraction < 1:  # the peer sends the same drawn positions
            pos = select_positions(self.s.seed, e, range(B), L, self.s.token_fraction)
            logits = gather_positions(logits.view(B, L, V), pos)
        if g in self.poison:
            logits = torch.full_like(logits, float("nan"))
        if self.s.kind == "samples":
            return sample_targets(logits, self.s.topk, self.s.temperature, self.s.dtype)
        return compress(logits, self.s.topk, wire_dtype(self.s.dtype), self.s.kind, self.s.temperature)

    def exchange(self, local: CompressedLogits, e: int, report: dict | None = None) -> ExchangeResult:
        self.calls.append(e)
        got = [(g, e - self.lag.get(g, 0)) for g in self.peers]
        sent = pack(local).numel() * len(self.peers)
        self.bytes_sent += sent
        return ExchangeResult([self.payload(g, pe) for g, pe in got], [g for g, _ in got], 0.001,
                              [pe for _, pe in got] if self.lag else None, sent)

    def start(self, local: CompressedLogits, e: int, report: dict | None = None):
        return self._pool.submit(self.exchange, local, e, report)

    def join(self, groups: int, wait_s: float) -> int:
        return groups

    def close(self) -> None:
        self._pool.shutdown()


def engine(settings: ExchangeSettings, transport, group_id: int = 0) -> ExchangeEngine:
    return ExchangeEngine(transport=transport, settings=settings, group=dist.group.WORLD, group_id=group_id,
                          batch_for=batch_for)


def run(eng: ExchangeEngine, steps: int, group: int = 0) -> dict[int, list]:
    return {s: eng.step(s, model(group)) for s in range(steps)}


def test_targets_come_due_staleness_steps_later_on_their_batch():
    s = ExchangeSettings(interval=2, staleness=1, topk=8, dtype="fp32")
    t = PeerTransport(s, [1, 2])
    eng = engine(s, t)
    due = run(eng, 7)
    eng.drain()  # the swap posted at step 6 runs on the transport's thread
    assert t.calls == [0, 1, 2, 3]  # posted at steps 0, 2, 4, 6 (exchange e = step // 2)
    assert {k for k, v in due.items() if v} == {1, 3, 5}
    for step in (1, 3, 5):
        (target,) = due[step]
        e = (step - 1) // 2
        assert target.exchange == e and target.peer_groups == [1, 2]
        assert torch.equal(target.inputs, batch_for(-1, e).inputs)
        for p, g in zip(target.peers, target.peer_groups):
            assert torch.equal(p.values, t.payload(g, e).values) and torch.equal(p.indices, t.payload(g, e).indices)


def test_loss_is_the_mean_divergence_from_the_peers_and_bytes_are_counted():
    s = ExchangeSettings(topk=8, dtype="bf16", loss="jsd", temperature=2.0, peer_weights=((2, 3.0),))
    t = PeerTransport(s, [1, 2])
    eng = engine(s, t)
    (target,) = eng.step(0, model(0))
    student = torch.randn(B * L, V, requires_grad=True)
    got = eng.distill_loss([student], [target])
    peers = [t.payload(1, 0), t.payload(2, 0)]
    want = peer_distill_loss(student, peers, "jsd", 2.0, None, [1.0, 3.0])
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    assert eng.bytes_sent == t.bytes_sent == 2 * pack(compress(model(0)(target.inputs), 8, torch.bfloat16,
                                                               "logprobs", 2.0)).numel()
    assert eng.stats.peers == 2 and eng.stats.agreement is not None


def test_a_peer_with_nan_is_dropped_and_counted(caplog):
    s = ExchangeSettings(topk=4, dtype="fp32")
    eng = engine(s, PeerTransport(s, [1, 2], poison=(2,)))
    with caplog.at_level(logging.WARNING, logger="codistill_ds"):
        logging.getLogger("codistill_ds").propagate = True
        try:
            (target,) = eng.step(0, model(0))
        finally:
            logging.getLogger("codistill_ds").propagate = False
    assert target.peer_groups == [1] and eng.skipped_peers == 1 and eng.stats.peers == 1
    assert "group 0 skipped the predictions of peer group(s) [2] for exchange 0" in caplog.text


def test_a_weight_of_zero_drops_the_peer():
    s = ExchangeSettings(topk=4, dtype="fp32", peer_weights=((1, 0.0),))
    (target,) = engine(s, PeerTransport(s, [1, 2])).step(0, model(0))
    assert target.peer_groups == [2]


def test_peers_out_of_lockstep_are_distilled_on_their_own_batch():
    """Peer 2 sent its prediction for exchange e-1 (it is behind): the batch is rebuilt locally,
    mine comes first, and each target batch holds exactly the peers of that exchange."""
    s = ExchangeSettings(topk=4, dtype="fp32")
    t = PeerTransport(s, [1, 2], lag={2: 1})
    eng = engine(s, t)
    eng.step(0, model(0))
    mine, behind = eng.step(1, model(0))
    assert (mine.exchange, mine.peer_groups) == (1, [1]) and (behind.exchange, behind.peer_groups) == (0, [2])
    assert torch.equal(behind.inputs, batch_for(-1, 0).inputs)
    assert torch.equal(behind.peers[0].values, t.payload(2, 0).values)
    students = [torch.randn(B * L, V), torch.randn(B * L, V)]
    want = (peer_distill_loss(students[0], [t.payload(1, 1)], "kl", 1.0)
            + peer_distill_loss(students[1], [t.payload(2, 0)], "kl", 1.0)) / 2
    assert torch.allclose(eng.distill_loss(students, [mine, behind]), want, atol=1e-7)


def test_asynchronous_swaps_deliver_what_blocking_ones_do():
    blocking = ExchangeSettings(staleness=2, async_exchange=False, topk=8)
    posted = ExchangeSettings(staleness=2, async_exchange=True, topk=8)
    a, b = run(engine(blocking, PeerTransport(blocking, [1])), 6), run(engine(posted, PeerTransport(posted, [1])), 6)
    for step in range(6):
        assert len(a[step]) == len(b[step]) == (1 if step >= 2 else 0)
        for x, y in zip(a[step], b[step]):
            assert x.exchange == y.exchange == step - 2 and torch.equal(x.peers[0].values, y.peers[0].values)


def test_pending_targets_survive_a_checkpoint():
    s = ExchangeSettings(staleness=2, topk=8)
    t = PeerTransport(s, [1])
    first = engine(s, t)
    run(first, 2)  # targets of exchanges 0 and 1 are pending, due at steps 2 and 3
    state = first.state_dict()
    resumed = engine(s, PeerTransport(s, [1]))
    resumed.load_state_dict(state)
    again = first.step(2, model(0)), first.step(3, model(0))
    got = resumed.step(2, model(0)), resumed.step(3, model(0))
    for x, y in zip(again, got):
        assert x[0].exchange == y[0].exchange and torch.equal(x[0].peers[0].values, y[0].peers[0].values)
    assert resumed.bytes_sent == first.bytes_sent


def _sent(settings: ExchangeSettings, group: int, exchanges: list[int]) -> dict[int, CompressedLogits]:
    eng = engine(settings, PeerTransport(settings, [1 - group]), group_id=group)
    out: dict[int, CompressedLogits] = {}
    eng.observers.append(lambda event, step, payload: event == "sent" and out.setdefault(step, payload))
    for e in exchanges:
        eng.step(e, model(group))
    return out


def test_sampled_targets_are_drawn_anew_per_exchange_and_group_and_again_on_resume():
    """Kind "samples": each (exchange, group) draws with its own generator, so two exchanges or
    two groups never share their random numbers (the draws from one teacher on one batch would
    then be the same ids); a resumed run (a fresh engine) draws exactly what the first did."""
    s = ExchangeSettings.from_config(CodistillConfig(targets="samples", topk=6, dtype="fp32"), seed=5)
    same_logits = model(0)  # one teacher for everyone: only the generator can make draws differ
    draws = {}
    for group in (0, 1):
        eng = engine(s, PeerTransport(s, [1 - group]), group_id=group)
        eng.observers.append(lambda ev, step, p, g=group: ev == "sent" and draws.setdefault((g, step), p.indices))
        for step in range(4):
            eng.step(step, same_logits)
    keys = sorted(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(draws[a], draws[b]), (a, b)
    resumed = engine(s, PeerTransport(s, [1]), group_id=0)
    again = {}
    resumed.observers.append(lambda ev, step, p: ev == "sent" and again.setdefault(step, p.indices))
    resumed.step(3, same_logits)
    assert torch.equal(again[3], draws[(0, 3)])


def test_token_fraction_sends_the_drawn_positions_and_gathers_the_student_there():
    s = ExchangeSettings(topk=4, dtype="fp32", token_fraction=0.5, seed=9)
    t = PeerTransport(s, [1])
    eng = engine(s, t)
    sent = {}
    eng.observers.append(lambda ev, step, p: ev == "sent" and sent.setdefault(step, p))
    (target,) = eng.step(0, model(0))
    pos = select_positions(9, 0, range(B), L, 0.5)
    assert torch.equal(target.positions, pos)
    mine = gather_positions(model(0)(batch_for(0, 0).inputs).view(B, L, V), pos)
    assert torch.equal(sent[0].values, compress(mine, 4, torch.float32, "logprobs", 1.0).values)
    assert target.peers[0].num_tokens() == B * pos.shape[1] == B * 3
    student = torch.randn(B * L, V)
    at = gather_positions(student.view(B, L, V), pos)
    assert torch.allclose(eng.distill_loss([student], [target]),
                          peer_distill_loss(at, target.peers, "kl", 1.0), atol=1e-7)


def test_settings_come_from_the_config_by_name():
    cd = CodistillConfig(interval=3, staleness=2, topk=5, dtype="fp8", loss="mse", temperature=1.5,
                         token_fraction=0.25, peer_weights=[(1, 0.5)])
    s = ExchangeSettings.from_config(cd, seed=11)
    assert (s.interval, s.staleness, s.topk, s.dtype, s.loss, s.temperature, s.token_fraction, s.seed) == (
        3, 2, 5, "fp8", "mse", 1.5, 0.25, 11)
    assert s.kind == "logits" and s.weight_of(1) == 0.5 and s.weight_of(7) == 1.0
    assert ParallelDims(world_size=1, groups=1, rank=0).group_size == 1


# ---- issue 24: checks that fail when the feature breaks ---------------------------------------

class BlockingTransport(PeerTransport):
    """A swap that cannot finish until the test releases it, and that records the thread it ran on."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.release, self.entered, self.threads = threading.Event(), threading.Event(), []

    def exchange(self, local: CompressedLogits, e: int, report: dict | None = None) -> ExchangeResult:
        self.threads.append(threading.current_thread() is threading.main_thread())
        self.entered.set()
        self.release.wait(timeout=3)
        return super().exchange(local, e)


def test_an_asynchronous_post_returns_before_the_swap_finishes():
    """Posting with staleness 1 hands the swap to the transport's thread and returns while it is
    still blocked; the targets arrive at the consumption step. A swap run synchronously (the
    posting step blocked on it) would take the transport's 3 s and run on the main thread."""
    s = ExchangeSettings(staleness=1, async_exchange=True, topk=4, dtype="fp32")
    t = BlockingTransport(s, [1])
    eng = engine(s, t)
    start = time.perf_counter()
    assert eng.step(0, model(0)) == []
    posted_in = time.perf_counter() - start
    assert t.entered.wait(timeout=2) and not t.release.is_set()  # the swap is under way, unfinished
    assert posted_in < 1.0, posted_in
    t.release.set()
    (target,) = eng.step(1, model(0))
    assert target.exchange == 0 and t.threads == [False, False]  # both swaps on the background thread
    eng.close()


def test_peer_weights_over_three_peers_and_two_batches_are_the_hand_weighted_mean():
    """Weights {1: 0.5, 2: 0, 3: 2}: peer 2 is dropped, peer 3 is one exchange behind (its batch
    rebuilt), and the loss is (0.5 D(s_e, p1) + 2 D(s_e-1, p3)) / 2.5, each D computed alone."""
    s = ExchangeSettings(topk=4, dtype="fp32", peer_weights=((1, 0.5), (2, 0.0), (3, 2.0)))
    t = PeerTransport(s, [1, 2, 3], lag={3: 1})
    eng = engine(s, t)
    eng.step(0, model(0))
    mine, behind = eng.step(1, model(0))
    assert (mine.peer_groups, behind.peer_groups) == ([1], [3]) and eng.stats.peers == 2
    students = [torch.randn(B * L, V), torch.randn(B * L, V)]
    d1 = distill_loss(students[0], t.payload(1, 1), "kl", 1.0)
    d3 = distill_loss(students[1], t.payload(3, 0), "kl", 1.0)
    want = (0.5 * d1 + 2.0 * d3) / 2.5
    assert torch.allclose(eng.distill_loss(students, [mine, behind]), want, rtol=0, atol=1e-6)


def test_students_are_cut_from_the_batched_forward_at_their_offsets():
    """The loop runs one forward on [my micro-batch; batch e; batch e'] and cuts each target
    batch's rows out: my rows for a batch without inputs, else the next rows in order."""
    n, logits = 2, torch.randn(2 + 3 + 4, L, V)
    own = TargetBatch(0, None, [], [])
    first = TargetBatch(1, torch.zeros(3, L + 1, dtype=torch.long), [], [])
    second = TargetBatch(2, torch.zeros(4, L + 1, dtype=torch.long), [], [])
    got = students_of(logits.flatten(0, 1), n, L, [first, own, second])
    assert torch.equal(got[0], logits[2:5].flatten(0, 1)) and torch.equal(got[1], logits[:2].flatten(0, 1))
    assert torch.equal(got[2], logits[5:9].flatten(0, 1))


# Masked exchange batches: padding and -100 labels, as a user's dataset gives them.

PAD = 0


def masked_rows(n: int = 12) -> list[dict]:
    """Rows of L tokens: a random real length (padding after it, attention 0, label -100) and,
    on every third row, a two-token prompt labelled -100."""
    g = torch.Generator().manual_seed(77)
    rows = []
    for i in range(n):
        real = int(torch.randint(2, L + 1, (1,), generator=g))
        ids = torch.randint(1, V, (L,), generator=g)
        ids[real:] = PAD
        attn = (torch.arange(L) < real).long()
        labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
        if i % 3 == 0:
            labels[:2] = -100
        rows.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return rows


def hand_mask(inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Position t counts when attended and the label it predicts (t+1) is not -100; the last
    position has no next label and counts when attended. Written out position by position."""
    out = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            nxt = labels[b, t + 1] != -100 if t + 1 < labels.shape[1] else True
            out.append(bool(inputs["attention_mask"][b, t]) and bool(nxt))
    return torch.tensor(out)


def dict_model(group: int):
    w = table(group)
    return lambda inputs: w[inputs["input_ids"]].flatten(0, 1)


class DictPeers(PeerTransport):
    """Peers that predict on the dataset's exchange batches (dict inputs)."""

    def __init__(self, settings: ExchangeSettings, peers: list[int], batches) -> None:
        super().__init__(settings, peers)
        self.batches = batches

    def logits(self, g: int, e: int) -> torch.Tensor:
        logits = dict_model(g)(self.batches(-1, e).inputs)
        if self.s.token_fraction < 1:
            pos = select_positions(self.s.seed, e, range(B), L, self.s.token_fraction)
            logits = gather_positions(logits.view(B, L, V), pos)
        return logits

    def payload(self, g: int, e: int) -> CompressedLogits:
        return compress(self.logits(g, e), self.s.topk, wire_dtype(self.s.dtype), self.s.kind, self.s.temperature)


def masked_engine(fraction: float):
    from codistill_ds.integrations.exchange_data import ExchangeBatches

    rows = masked_rows()
    collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batches = ExchangeBatches(rows, 5, B, ParallelDims(world_size=1, groups=1, rank=0), collate, torch.device("cpu"))
    s = ExchangeSettings(topk=4, dtype="fp32", token_fraction=fraction, seed=13)
    t = DictPeers(s, [1], batches)
    eng = ExchangeEngine(transport=t, settings=s, group=dist.group.WORLD, group_id=0, batch_for=batches)
    return eng, t, batches


@pytest.mark.parametrize("e", [0, 1, 2])
def test_masked_batches_count_only_their_real_positions(e: int):
    """Issue 24, item 5: padding and -100 labels through the engine. The mask is the hand mask;
    agreement counts only kept positions; the engine's distill_eval and the student's loss
    equal the plain loss over the kept rows alone (no mask argument at all)."""
    eng, t, batches = masked_engine(1.0)
    exb = batches(0, e)
    collate_labels = torch.stack([masked_rows()[int(i)]["labels"] for i in batches.order(
        np.arange(e * B, e * B + B))])
    keep = hand_mask(exb.inputs, collate_labels)
    assert torch.equal(exb.mask, keep) and 0 < int(keep.sum()) < keep.numel()
    for step in range(e + 1):
        due = eng.step(step, dict_model(0))
    (target,) = due
    mine, peer = dict_model(0)(exb.inputs), t.logits(1, e)
    agree = (mine.argmax(-1) == peer.argmax(-1))[keep]
    assert eng.stats.agreement == pytest.approx(agree.float().mean().item(), abs=1e-12)
    want_eval = distill_loss(mine[keep], compress(peer[keep], 4, torch.float32, "logprobs", 1.0), "kl", 1.0)
    assert eng.stats.distill_eval == pytest.approx(want_eval.item(), rel=1e-6)
    student = torch.randn(B * L, V)
    want = distill_loss(student[keep], compress(peer[keep], 4, torch.float32, "logprobs", 1.0), "kl", 1.0)
    assert torch.allclose(eng.distill_loss([student], [target]), want, rtol=1e-6, atol=1e-7)


def test_token_fraction_with_a_mask_keeps_the_real_positions_it_drew():
    """token_fraction 0.5 on masked batches: the drawn positions are select_positions' for
    (seed, e, rows); the mask travels gathered at them; the loss is over drawn AND kept
    positions, here rebuilt by indexing position by position."""
    eng, t, batches = masked_engine(0.5)
    e = 1
    eng.step(0, dict_model(0))
    (target,) = eng.step(1, dict_model(0))
    pos = select_positions(13, e, range(B), L, 0.5)
    assert torch.equal(target.positions, pos)
    full = batches(0, e).mask.view(B, L)
    drawn_mask = torch.tensor([[bool(full[b, int(p)]) for p in pos[b]] for b in range(B)]).flatten()
    assert torch.equal(target.mask, drawn_mask) and 0 < int(drawn_mask.sum()) < drawn_mask.numel()
    student = torch.randn(B * L, V)
    rows = [b * L + int(p) for b in range(B) for p in pos[b]]
    kept = [r for r, k in zip(rows, drawn_mask.tolist()) if k]
    peer = t.logits(1, e)  # [B*m, V] at the drawn positions
    want = distill_loss(student[kept], compress(peer[drawn_mask], 4, torch.float32, "logprobs", 1.0), "kl", 1.0)
    assert torch.allclose(eng.distill_loss([student], [target]), want, rtol=1e-6, atol=1e-7)

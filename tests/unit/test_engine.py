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
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from codistill_ds.config import CodistillConfig
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.distributed.env import free_port
from codistill_ds.exchange.batches import ExchangeBatch
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.exchange.losses import peer_distill_loss
from codistill_ds.exchange.sampling import (
    gather_positions,
    sample_targets,
    select_positions,
)
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.wire import CompressedLogits, compress, pack, wire_dtype

V, B, L = 40, 3, 6


@pytest.fixture(scope="module", autouse=True)
def one_rank_world():
    """The engine's group collectives (NaN agreement, agreement) over a world of one."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


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

    def exchange(self, local: CompressedLogits, e: int) -> ExchangeResult:
        self.calls.append(e)
        got = [(g, e - self.lag.get(g, 0)) for g in self.peers]
        sent = pack(local).numel() * len(self.peers)
        self.bytes_sent += sent
        return ExchangeResult([self.payload(g, pe) for g, pe in got], [g for g, _ in got], 0.001,
                              [pe for _, pe in got] if self.lag else None, sent)

    def start(self, local: CompressedLogits, e: int):
        return self._pool.submit(self.exchange, local, e)

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

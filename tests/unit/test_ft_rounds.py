"""Lighthouse rounds with a real in-process Lighthouse and real members (one thread per group,
each with its own gloo process group): the quorum asked one round ahead, the exchange index in
the payload's header, a group alone that knows it before computing, a group that joins a
running run, and one that retires and is neither exchanged with nor waited for.

No training and no launch: each test takes a few seconds. The multi-job versions (real jobs,
kills, restarts) are tests/dist/test_independent_groups.py and tests/dist/test_elastic_groups.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from codistill_ds.commands.lighthouse import start_lighthouse
from codistill_ds.distributed.launching import free_port
from codistill_ds.exchange.batches import ExchangeBatch
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.transport.frames import NO_PREDICTIONS, open_sealed, seal
from codistill_ds.exchange.transport.lighthouse import LighthouseMember

pytestmark = pytest.mark.timeout(120)

CONTRACT = {"vocab_size": 256, "max_groups": 4}
HEARTBEAT_TIMEOUT_MS = 1500


@pytest.fixture
def lighthouse():
    server, url = start_lighthouse(join_timeout_ms=4000, heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
    members: list[LighthouseMember] = []

    def member(g: int) -> LighthouseMember:
        m = LighthouseMember(url, g, CONTRACT, timeout_s=20.0)
        members.append(m)
        return m

    yield member
    for m in members:
        if not m._stop.is_set():
            m.close(retire=False)
    server.shutdown()


def together(*calls):
    """Run the calls in threads at once; their results in order (exceptions re-raised)."""
    out: list = [None] * len(calls)

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as err:  # noqa: BLE001 -- re-raised on the caller's thread
            out[i] = err

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def payload(g: int, e: int) -> torch.Tensor:
    return torch.full((64,), 10 * g + e % 10, dtype=torch.uint8)


def test_frame_round_trip():
    """The exchange index and the report travel in each frame's header (the quorum is asked
    before they are known), signed with the payload when there is a secret."""
    body = torch.arange(200, dtype=torch.uint8)
    for key in (None, b"s" * 32):
        for e in (0, 7, 2**40):
            report = {"loss": 2.5, "step": 40} if e else None
            got = open_sealed(seal(body, 200, e, report, key, "q1/0/a,b", "a"), 200, 200, key, "q1/0/a,b", "a")
            assert (got.exchange, got.report, got.problem) == (e, report, None) and torch.equal(got.payload, body)
        nothing = seal(torch.empty(0, dtype=torch.uint8), 200, NO_PREDICTIONS, None, key, "q1/0/a,b", "a")
        assert open_sealed(nothing, 200, 200, key, "q1/0/a,b", "a") is None  # sent nothing this round
    signed = seal(body, 200, 3, None, b"s" * 32, "q1/0/a,b", "a")
    assert open_sealed(signed, 200, 200, b"s" * 32, "q2/0/a,b", "a").problem == "auth"  # another round


def test_rounds_use_a_quorum_asked_one_round_ahead(lighthouse):
    a, b = lighthouse(0), lighthouse(1)
    assert together(lambda: a.join(2, 30), lambda: b.join(2, 30)) == [2, 2]
    keys = []
    for e in range(4):
        # Before the round (and before any prediction is computed) the next quorum is known.
        assert together(lambda: a.peers_ahead(block=True), lambda: b.peers_ahead(block=True)) == [1, 1]
        got_a, got_b = together(lambda e=e: a.round(e, payload(0, e)), lambda e=e: b.round(e + 100, payload(1, e)))
        assert [(p.group, p.exchange) for p in got_a] == [(1, e + 100)]
        assert [(p.group, p.exchange) for p in got_b] == [(0, e)]
        assert torch.equal(got_a[0].payload, payload(1, e)) and torch.equal(got_b[0].payload, payload(0, e))
        # The next round's quorum was asked right after the collective, on the background thread.
        assert a._ahead.in_flight() and b._ahead.in_flight()
        keys.append(a.pg._key)
    assert keys[0] is not None and len(set(keys)) == 1  # membership unchanged: one configured process group
    time.sleep(0.5)
    assert a._ahead.peek(block=False) is not None  # formed while "training"
    t0 = time.perf_counter()
    together(lambda: a.round(9, payload(0, 9)), lambda: b.round(9, payload(1, 9)))
    assert time.perf_counter() - t0 < 5.0
    assert a.pg._key == b.pg._key == keys[0]  # still the same process group


def test_a_group_alone_knows_before_computing(lighthouse):
    a = lighthouse(0)
    assert a.join(1, 10) == 1
    for _ in range(3):
        assert a.peers_ahead(block=True) == 0
        a.skip_round()
        assert a._ahead.in_flight()  # the next one is asked at once
    assert a.round(0, payload(0, 0)) == []


def test_an_unreachable_lighthouse_skips_rounds_at_once(lighthouse):
    """No heartbeat gets through (a link down): a quorum asked ahead that is not there yet is
    not waited for, neither before the teacher forward (`peers_ahead`) nor in the round, so the
    group trains on alone instead of waiting out the quorum timeout every round."""
    from codistill_ds.exchange.transport.quorum import Plan, QuorumAhead

    a = lighthouse(0)
    assert a.join(1, 10) == 1
    a._stop.set()  # no more heartbeats
    a._last_beat = time.monotonic() - 60
    a._ahead.close()
    a._ahead = QuorumAhead(lambda: time.sleep(5) or Plan(-1, [], None))  # a request that hangs
    a._ahead.request()
    t0 = time.perf_counter()
    assert a.peers_ahead(block=True) == 0
    assert a.round(0, payload(0, 0)) == [] and a.round(1, payload(0, 1)) == []
    assert time.perf_counter() - t0 < 1.0
    a._ahead.close()


class Runner:
    """One group training in a thread: a round every 50 ms, recording (seconds the round took,
    peer groups); `leave` ends the loop and closes with a retire mark (a clean farewell)."""

    def __init__(self, m: LighthouseMember, groups: int | None = None) -> None:
        self.m, self.log, self.joined = m, [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(groups,), daemon=True)
        self._thread.start()

    def _run(self, groups: int | None) -> None:
        if groups is not None:
            t0 = time.perf_counter()
            self.joined = (self.m.join(groups, 30), time.perf_counter() - t0)
        e = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            got = self.m.round(e, payload(self.m.group_id, e))
            self.log.append((time.perf_counter() - t0, sorted(p.group for p in got)))
            e += 1
            time.sleep(0.05)
        self.m.close(retire=True)

    def wait_for(self, what, cond, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"group {self.m.group_id}: no {what}; {self.log[-5:]}"
            time.sleep(0.05)

    def leave(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def test_a_group_joins_a_running_pair_and_one_retires(lighthouse):
    """Groups 0 and 1 exchange; group 2 (an id above `groups`, below max_groups) joins and
    exchanges with both; then group 1 retires: the others leave it out at once, do not block on
    the quorum the Lighthouse holds until its heartbeat times out, and a group that starts later
    expecting groups 0..2 does not wait for it at its join."""
    a, b, c = lighthouse(0), lighthouse(1), lighthouse(2)
    together(lambda: a.join(2, 30), lambda: b.join(2, 30))
    run = {0: Runner(a), 1: Runner(b)}
    run[0].wait_for("exchange", lambda: run[0].log and run[0].log[-1][1] == [1])
    run[2] = Runner(c, groups=3)
    for g, want in ((0, [1, 2]), (1, [0, 2]), (2, [0, 1])):
        run[g].wait_for("peers 2", lambda g=g, want=want: want in [p for _, p in run[g].log])
    assert run[2].joined[0] == 3
    mark = {g: len(run[g].log) for g in (0, 2)}
    run[1].leave()  # group 1 retires
    left = time.monotonic()
    for g, other in ((0, [2]), (2, [0])):
        run[g].wait_for("rounds after the retirement", lambda g=g: len(run[g].log) > mark[g] + 10 and
                        time.monotonic() - left > HEARTBEAT_TIMEOUT_MS / 1000 + 1)
        after = run[g].log[mark[g] + 2:]
        assert all(1 not in p for _, p in after), after
        assert other in [p for _, p in after[-5:]], after  # still exchanging with each other
        # No round waited out the retired job's heartbeat timeout (training went on alone).
        assert max(t for t, _ in run[g].log[mark[g]:]) < HEARTBEAT_TIMEOUT_MS / 1000 * 0.7, run[g].log[mark[g]:]
    assert a.retired == {1: b.nonce} and c.retired == {1: b.nonce}
    # A group that starts now and expects groups 0..2 does not wait for the retired group 1.
    run[3] = Runner(lighthouse(3), groups=3)
    run[3].wait_for("join", lambda: run[3].joined is not None)
    assert run[3].joined[0] == 3 and run[3].joined[1] < 5.0, run[3].joined
    assert run[3].m.retired == {1: b.nonce}
    for g in (0, 2, 3):
        run[g].leave()


class AskedTransport:
    """A transport that knows the next round's peer count (`peers_ahead`), like torchft's."""

    def __init__(self, ahead: int | None) -> None:
        self.ahead, self.rounds, self.asked = ahead, [], []
        self.bytes_sent = 0

    def peers_ahead(self, e: int, alone: bool) -> int | None:
        self.asked.append((e, alone))
        return self.ahead

    def exchange(self, local, e: int, report=None) -> ExchangeResult:
        self.rounds.append((e, local is None))
        return ExchangeResult([], [], 0.0, [], 0)


@pytest.fixture
def one_rank_world():
    """The engine's group collectives (agreement) over a world of one."""
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    if mine:
        dist.destroy_process_group()


def test_engine_skips_the_teacher_forward_when_no_peer_is_ahead(one_rank_world):
    forwards = []

    def predict(ids):
        forwards.append(ids.shape)
        return torch.randn(ids.shape[0] * (ids.shape[1] - 1), 16)

    def batch_for(step, e):
        return ExchangeBatch(torch.randint(0, 16, (2, 5)), rows=range(2))

    for ahead, computed in ((0, False), (None, True), (1, True)):
        t, forwards[:] = AskedTransport(ahead), []
        eng = ExchangeEngine(transport=t, settings=ExchangeSettings(topk=4, dtype="fp32"), group=one_rank_world,
                             group_id=0, batch_for=batch_for)
        for step in range(3):
            eng.step(step, predict)
            assert (eng.stats.exchange_compute_ms > 0) == computed
            if not computed:
                assert eng.stats.peers == 0
        assert bool(forwards) == computed and [e for e, _ in t.rounds] == [0, 1, 2]
        assert all(skipped == (not computed) for _, skipped in t.rounds)  # the round runs, without a payload
        assert t.asked[1:] == [(e, True) for e in (1, 2)]  # no peer in the last round: "alone"

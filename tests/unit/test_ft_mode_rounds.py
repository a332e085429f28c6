"""Every exchange mode over `transport: torchft`, the parts that need no launch.

- The Lighthouse rounds themselves, with a real in-process Lighthouse, one member per group and
  a process group per (group, rail) on threads: each rail meets only its own rail over the
  groups of the leader's view, an all-gather returns the peers' payloads in group order, and an
  all-to-all (`exchange_batch: train`) delivers the part a sender made for group h to h alone;
  a second job claiming a group id is refused.
- The engine under `exchange_batch: train` with a peer out of lockstep: its predictions cover my
  own batch of its exchange, which the engine rebuilds (`batch_for(-1, e)`), while the peers
  in lockstep predict on the batch I train on now (inputs None).
- The contract: the shape a mode relies on is in it, and only there.
- The config: train batches, rails and weights are accepted with torchft; `stale_teachers`
  takes keep | drop.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from codistill_ds.config import CodistillConfig, Config, ConfigError
from codistill_ds.config.validation import check_choices, check_topology
from codistill_ds.exchange.batches import ExchangeBatch
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.transport.contract import (
    IncompatibleGroup,
    exchange_contract,
)
from codistill_ds.exchange.wire import compress

pytestmark = pytest.mark.timeout(120)

K, RAILS = 3, 2


def contract(cd: CodistillConfig, group_size: int = RAILS) -> dict:
    return exchange_contract(cd, vocab_size=40, corpus_digest="c", seed=1, exchange_batch_size=4, seq_len=6,
                             kind="logprobs", group_size=group_size, train_stream=(2, 1), model=("m", "fsdp fp32"))


@pytest.fixture(scope="module")
def lighthouse_url():
    from codistill_ds.commands.lighthouse import start_lighthouse

    server, url = start_lighthouse(port=0, bind="127.0.0.1", join_timeout_ms=20000, heartbeat_timeout_ms=5000)
    yield url
    server.shutdown()


def on_threads(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return dict(zip(items, pool.map(fn, items)))


def close_together(members: dict) -> None:
    """Every member leaves at once, as jobs that stop together do: a member's farewell round
    counts on the others' taking part, so leaving one after another would make each wait out
    the round's timeout for peers still training."""
    on_threads(lambda name: members[name].close(), list(members))


def test_rails_meet_rank_r_of_the_view_and_parts_reach_their_owner_only(lighthouse_url):
    """One Lighthouse member per group (its leader) asks for the view of a round; each rail runs
    its own collective over the groups of that view (`rails.FTRails` broadcasts it inside the
    group; here the threads share it). The part (g, rail r) makes for h is [h, g, r, 7]."""
    from codistill_ds.exchange.transport.lighthouse import LighthouseMember
    from codistill_ds.exchange.transport.quorum_pg import (
        AllGather,
        AllToAll,
        QuorumGroup,
    )

    cd = CodistillConfig(groups=K, transport="torchft", route="rails", exchange_batch="train")
    ms = {g: LighthouseMember(lighthouse_url, g, contract(cd), 20.0) for g in range(K)}
    pgs = {(g, r): QuorumGroup(20.0, f"rail{r}") for g in range(K) for r in range(RAILS)}
    try:
        assert set(on_threads(lambda g: ms[g].join(K, 30), list(ms)).values()) == {K}
        views = on_threads(lambda g: ms[g].view(0), list(ms))
        assert len({(v.quorum_id, v.replica_ids, v.groups) for v in views.values()}) == 1
        assert sorted(views[0].groups) == list(range(K))

        parts = {key: {h: torch.tensor([h, key[0], key[1], 7], dtype=torch.uint8) for h in range(K) if h != key[0]}
                 for key in pgs}
        got = on_threads(lambda key: pgs[key].run(views[key[0]], key[0], AllToAll(parts[key]), 0), list(pgs))
        for (g, r), peers in got.items():
            assert [p.group for p in peers] == [h for h in range(K) if h != g]
            for p in peers:
                assert p.exchange == 0 and p.payload.tolist() == [g, p.group, r, 7], ((g, r), p)

        got = on_threads(lambda key: pgs[key].run(views[key[0]], key[0], AllGather(
            torch.tensor([key[0], key[1]], dtype=torch.uint8)), 0), list(pgs))
        for (g, r), peers in got.items():
            assert [(p.group, p.payload.tolist()) for p in peers] == [(h, [h, r]) for h in range(K) if h != g]

        # The leaders route: the member's own round, whole payloads in group order.
        got = on_threads(lambda g: ms[g].round(1, torch.tensor([g, 9], dtype=torch.uint8)), list(ms))
        for g, peers in got.items():
            assert [(p.group, p.exchange, p.payload.tolist()) for p in peers] == [
                (h, 1, [h, 9]) for h in range(K) if h != g]
    finally:
        for pg in pgs.values():
            pg.close()
        close_together(ms)


def test_every_collective_signs_its_frames_and_the_rails_agree_on_what_was_refused(lighthouse_url, monkeypatch):
    """With a shared secret every frame of every collective is signed and checked before it is
    unpacked: the leaders' all-gather, and each rail's all-to-all. Rail 0 of group 1 sends group
    0 a truncated part ("malformed" there, fine for group 2); rail 1 of group 2 signs with another
    secret ("auth" both ways). Reports travel in the signed header. `rails.agree` then keeps, on
    every rank of a group, only the peers every rail got intact, and counts each refused peer
    once, by its worst reason."""
    import threading
    from types import SimpleNamespace

    from codistill_ds.distributed import comm
    from codistill_ds.exchange.transport import rails
    from codistill_ds.exchange.transport.lighthouse import LighthouseMember
    from codistill_ds.exchange.transport.quorum_pg import AllToAll, QuorumGroup

    key = b"k" * 32
    cd = CodistillConfig(groups=K, transport="torchft", route="rails", exchange_batch="train")
    ms = {g: LighthouseMember(lighthouse_url, g, contract(cd), 20.0, key=key) for g in range(K)}
    pgs = {(g, r): QuorumGroup(20.0, f"rail{r}", b"o" * 32 if (g, r) == (2, 1) else key)
           for g in range(K) for r in range(RAILS)}
    report = {g: {"loss": g + 0.5, "step": 3} for g in range(K)}
    try:
        assert set(on_threads(lambda g: ms[g].join(K, 30), list(ms)).values()) == {K}
        got = on_threads(lambda g: ms[g].round(4, torch.tensor([g, 9], dtype=torch.uint8), report[g]), list(ms))
        for g, peers in got.items():
            assert [(p.group, p.exchange, p.payload.tolist(), p.report, p.problem) for p in peers] == [
                (h, 4, [h, 9], report[h], None) for h in range(K) if h != g]

        views = on_threads(lambda g: ms[g].view(5), list(ms))

        def part(h, g, r):
            whole = torch.tensor([h, g, r, 7] * 2, dtype=torch.uint8)
            return whole[:3] if (g, r, h) == (1, 0, 0) else whole

        got = on_threads(lambda key_: pgs[key_].run(views[key_[0]], key_[0], AllToAll(
            {h: part(h, *key_) for h in range(K) if h != key_[0]}), 5, report[key_[0]]), list(pgs))
        problems = {key_: {p.group: p.problem for p in peers} for key_, peers in got.items()}
        assert problems == {(0, 0): {1: "malformed", 2: None}, (0, 1): {1: None, 2: "auth"},
                            (1, 0): {0: None, 2: None}, (1, 1): {0: None, 2: "auth"},
                            (2, 0): {0: None, 1: None}, (2, 1): {0: "auth", 1: "auth"}}
        for (g, r), peers in got.items():
            for p in peers:
                if p.problem is None:
                    assert p.payload.tolist() == [g, p.group, r, 7] * 2 and p.report == report[p.group]
                    assert p.exchange == 5
                else:
                    assert p.payload is None

        # `agree` over the two rails of each group: an all-reduce (max) between its two "ranks".
        pending: dict = {}
        lock, barrier = threading.Lock(), threading.Barrier(2 * K)

        def all_reduce(v, op=None, group=None):
            with lock:
                pending.setdefault(group, []).append(v)
            barrier.wait()
            v.copy_(torch.stack(pending[group]).max(0).values)

        monkeypatch.setattr(comm, "all_reduce", all_reduce)
        topo = {g: SimpleNamespace(groups=K, group_size=RAILS, exchange_group=f"group{g}") for g in range(K)}
        agreed = on_threads(lambda key_: rails.agree(got[key_], topo[key_[0]]), list(pgs))
        for (g, _), (kept, failed, rejected) in agreed.items():
            assert not failed
            want = {0: ([], {"malformed": 1, "auth": 1}), 1: ([0], {"auth": 1}), 2: ([], {"auth": 2})}[g]
            assert ([p.group for p in kept], rejected) == want, (g, kept, rejected)
            assert all(p.report == report[p.group] for p in kept)
    finally:
        for pg in pgs.values():
            pg.close()
        close_together(ms)


def test_a_second_job_claiming_a_group_is_refused(lighthouse_url):
    from codistill_ds.exchange.transport.lighthouse import LighthouseMember

    cd = CodistillConfig(groups=2, transport="torchft", route="rails")
    ms = {"g0": LighthouseMember(lighthouse_url, 0, contract(cd), 20.0),
          "g1": LighthouseMember(lighthouse_url, 1, contract(cd), 20.0)}
    ms["dup"] = LighthouseMember(lighthouse_url, 0, contract(cd), 20.0)  # younger

    def join(name):
        try:
            return ms[name].join(2, 20)
        except IncompatibleGroup as err:
            return err.field

    try:
        out = on_threads(join, list(ms))
        assert out == {"g0": 2, "g1": 2, "dup": "codistill.group_id"}, out
    finally:
        for m in ms.values():  # nothing to say farewell to: no round was run
            m.close(retire=False)


def test_contract_holds_the_shape_only_where_a_mode_relies_on_it():
    shared = contract(CodistillConfig())
    assert shared["group_size"] is None and shared["groups"] is None and shared["model"] is None
    rails = contract(CodistillConfig(route="rails"))
    assert rails["group_size"] == RAILS and rails["groups"] is None
    train = contract(CodistillConfig(groups=3, exchange_batch="train"))
    assert (train["group_size"], train["groups"], train["micro_batch_size"], train["grad_accum"]) == (RAILS, 3, 2, 1)
    weights = contract(CodistillConfig(mode="weights"))
    assert (weights["group_size"], weights["model"], weights["backend"]) == (RAILS, "m", "fsdp fp32")
    assert contract(CodistillConfig(route="rails"), 4) != rails  # another shape is refused at the quorum


@pytest.mark.parametrize("overrides", [{"exchange_batch": "train"}, {"route": "rails"}, {"mode": "weights"},
                                       {"mode": "weights", "stale_teachers": "drop"}])
def test_every_mode_is_accepted_with_torchft(overrides):
    cfg = Config(codistill=CodistillConfig(transport="torchft", group_id=0, lighthouse="http://127.0.0.1:1",
                                           **overrides))
    check_topology(cfg, 2)
    check_choices(cfg)
    bad = Config(codistill=CodistillConfig(stale_teachers="forget"))
    with pytest.raises(ConfigError, match="codistill.stale_teachers"):
        check_choices(bad)


# ---- the engine: train batches with a peer out of lockstep -----------------------------------------

V, B, L, INTERVAL = 20, 2, 5, 2




def my_batch(step: int) -> torch.Tensor:
    return torch.randint(0, V, (B, L + 1), generator=torch.Generator().manual_seed(step))


class LaggingPeers:
    """Peer 1 in lockstep, peer 2 one exchange behind: each sends predictions on my batch of its
    own exchange (what `exchange_batch: train` routes to me)."""

    bytes_sent = 0

    def exchange(self, local, e, report=None):
        def on(step):
            return compress(torch.randn(B * L, V, generator=torch.Generator().manual_seed(step)), 4,
                            torch.float32, "logprobs", 1.0)
        return ExchangeResult([on(e), on(e - 1)], [1, 2], 0.0, [e, e - 1], 0)

    def close(self):
        pass


def test_train_batches_out_of_lockstep_rebuild_my_own_batch(one_rank_world):
    def batch_for(step: int, e: int) -> ExchangeBatch:
        # step >= 0: my peers' batches (what I predict on); step -1: my own batch of exchange e.
        return ExchangeBatch(my_batch(e * INTERVAL) if step < 0 else torch.zeros(2 * B, L + 1, dtype=torch.long))

    s = ExchangeSettings(interval=INTERVAL, topk=4, dtype="fp32")
    eng = ExchangeEngine(transport=LaggingPeers(), settings=s, group=dist.group.WORLD, group_id=0,
                         batch_for=batch_for, on_own_batch=True)
    now, behind = eng.step(2 * INTERVAL, lambda ids: torch.randn(ids.shape[0] * L, V))
    assert (now.exchange, now.peer_groups, now.inputs) == (2, [1], None)  # the batch I train on now
    assert (behind.exchange, behind.peer_groups) == (1, [2])
    assert torch.equal(behind.inputs, my_batch(INTERVAL))  # my batch of exchange 1, rebuilt here

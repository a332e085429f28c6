"""Multi-rank checks of topology and exchange on real gloo process groups (no DeepSpeed)."""

from __future__ import annotations

import pytest

from launch import run_worker

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=[(4, 2), (6, 3)], ids=["W4K2", "W6K3"])
def ranks(request, tmp_path_factory):
    world, K = request.param
    return K, run_worker("exchange_check", world, tmp_path_factory.mktemp(f"ex{K}"), str(K))


def test_process_group_membership(ranks):
    K, res = ranks
    world = len(res)
    S = world // K
    for r in res:
        g, lr = r["rank"] // S, r["rank"] % S
        assert (r["group"], r["group_rank"]) == (g, lr)
        assert r["group_members"] == list(range(g * S, (g + 1) * S))
        assert r["rail_members"] == [h * S + lr for h in range(K)]
        assert r["mp_members"] == [r["rank"]]
        assert r["leaders_members"] == ([h * S for h in range(K)] if lr == 0 else [])


def test_routes_deliver_reference_logits(ranks):
    K, res = ranks
    for r in res:
        assert r["leaders_equal"] and r["rails_equal"], r["rank"]
        assert r["leaders_npeers"] == r["rails_npeers"] == K - 1


def test_cross_group_bytes_match_formula(ranks):
    K, res = ranks
    S = len(res) // K
    for r in res:
        assert r["rails_bytes"] == (K - 1) * r["payload"]
        assert r["leaders_bytes"] == ((K - 1) * S * r["payload"] if r["group_rank"] == 0 else 0)
    # Summed over every rank, both routes move exactly what `plan` predicts for one exchange.
    assert sum(r["rails_bytes"] for r in res) == res[0]["plan_exchange_bytes"]
    assert sum(r["leaders_bytes"] for r in res) == res[0]["plan_exchange_bytes"]


def test_same_exchange_batch_different_training_batches(ranks):
    K, res = ranks
    S = len(res) // K
    for lr in range(S):
        rail = [r for r in res if r["group_rank"] == lr]
        assert all(r["exchange_digests"] == rail[0]["exchange_digests"] for r in rail)
    rows_by_group = {}
    for r in res:
        rows = {row for step in r["train_rows"] for row in step}
        rows_by_group.setdefault(r["group"], set()).update(rows)
    groups = list(rows_by_group.values())
    for i in range(K):
        for j in range(i + 1, K):
            assert not groups[i] & groups[j], "two groups trained on the same sequence"
    # Inside a group, ranks split the batch: no rank repeats another's rows at a step.
    for g in range(K):
        members = [r for r in res if r["group"] == g]
        for step in range(5):
            seen = [row for m in members for row in m["train_rows"][step]]
            assert len(seen) == len(set(seen))

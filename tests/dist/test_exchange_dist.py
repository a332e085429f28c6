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
        for name, f in r["formats"].items():
            assert f["leaders_equal"] and f["rails_equal"], (r["rank"], name)
            assert f["leaders_npeers"] == f["rails_npeers"] == K - 1


VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
ID_BYTES = {None: 0, "uint16": 2, "int32": 4}


def test_cross_group_bytes_match_formula_for_every_wire_format(ranks):
    K, res = ranks
    S = len(res) // K
    names = res[0]["formats"]
    assert len(names) == 11
    for name in names:
        rows = [r["formats"][name] for r in res]
        f = rows[0]
        # 15 positions per rank slice; k (value + id bytes) + 1 scale byte for fp8, by hand.
        per_position = f["k"] * (VALUE_BYTES[f["value_dtype"]] + ID_BYTES[f["index_dtype"]])
        per_position += 1 if f["value_dtype"] == "fp8" else 0
        assert f["payload"] == f["packed"] == 15 * per_position, name
        for r, row in zip(res, rows):
            assert row["rails_bytes"] == (K - 1) * row["payload"], name
            assert row["leaders_bytes"] == ((K - 1) * S * row["payload"] if r["group_rank"] == 0 else 0)
        # Summed over every rank, both routes move exactly what `plan` predicts for one exchange.
        assert sum(row["rails_bytes"] for row in rows) == f["plan_exchange_bytes"], name
        assert sum(row["leaders_bytes"] for row in rows) == f["plan_exchange_bytes"], name
    # exchange_batch "train": each rank's chunk reaches only its owner, exactly; the bytes are
    # (K-1) chunks per rank (rails) or per group (leaders), no more than a shared exchange of
    # the same batch: what `plan` states, with no copy of a group's own batch sent anywhere.
    for r in res:
        o = r["to_owners"]
        assert o["rails_equal"] and o["leaders_equal"], r["rank"]
        assert o["rails_bytes"] == (K - 1) * o["chunk_bytes"]
        assert o["leaders_bytes"] == ((K - 1) * S * o["chunk_bytes"] if r["group_rank"] == 0 else 0)
    assert sum(r["to_owners"]["rails_bytes"] for r in res) == res[0]["to_owners"]["plan_exchange_bytes"]
    assert sum(r["to_owners"]["leaders_bytes"] for r in res) == res[0]["to_owners"]["plan_exchange_bytes"]
    sizes = {name: names[name]["payload"] // 15 for name in names}
    assert sizes["bf16-int32-top8"] == 48 and sizes["bf16-uint16-top8"] == 32
    assert sizes["fp8-uint16-top8"] == 25 and sizes["fp8-uint16-top1"] == 4
    assert sizes["fp8-full"] == 301 and sizes["samples-bf16-uint16"] == 16


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

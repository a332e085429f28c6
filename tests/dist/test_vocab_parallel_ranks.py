"""The vocabulary-parallel exchange and losses over 4 real gloo ranks: T = 2 and T = 4 against the
unsharded code, DTensor slices, and a K = 2 x T = 2 row-split swap (the matrix the worker computes;
the same matrix on threads: tests/unit/test_vocab_parallel.py)."""

from __future__ import annotations

import pytest
from vocab_checks import TOL, WIRE_REL, W, assert_matrix

from launch import run_worker


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    return run_worker("vocab_parallel_check", 4, tmp_path_factory.mktemp("vp"), timeout=600)


@pytest.mark.timeout(700)
@pytest.mark.parametrize("T", [2, 4])
def test_gloo_losses_teacher_and_guards(gloo, T):
    groups = [gloo[0:2], gloo[2:4]] if T == 2 else [gloo]
    for ranks in groups:
        assert_matrix([r[f"T{T}"] for r in ranks])


@pytest.mark.timeout(700)
def test_gloo_dtensor_slices(gloo):
    for T in (2, 4):
        rows = [r[f"dtensor_T{T}"] for r in gloo]
        for r in rows:
            assert r["width"] == 48 // T and r["offset"] == r["rank"] * (48 // T), r
            assert r["value_err"] <= TOL and r["grad_err"] <= TOL, r
            assert "DTensor sharded along the vocabulary" in r["refused"], r


@pytest.mark.timeout(700)
def test_gloo_row_split_exchange_k2_t2(gloo):
    """Each TP rank sends its rows chunk over its rail; the TP group reassembles the peer's
    payload: the peer's own payload bit for bit, the unsharded reference's ids, its values to the
    wire step; the group's T ranks send exactly the T = 1 bytes."""
    ex = [r["exchange"] for r in gloo]
    for name in ex[0]:
        if name == "tp_rank":
            continue
        dt = W.FORMATS[name][0]
        for rank, e in enumerate(ex):
            peer_rank = (rank + 2) % 4  # the other group's rank with my TP rank
            c = e[name]
            assert c["peer_digest"] == ex[peer_rank][name]["own_digest"], (name, rank)
            assert c["ids_equal"], (name, rank)
            tol = WIRE_REL[dt] * 64  # |values| < 64 here: one wire step absolute
            assert c["value_err"] <= tol, (name, rank, c)
            if "loss_err" in c:
                assert c["loss_err"] <= TOL * max(1.0, abs(c["loss_ref"])) and c["grad_err"] <= TOL, (name, rank, c)
        for g in (0, 1):
            sent = [ex[2 * g + t][name]["sent_bytes"] for t in range(2)]
            assert sum(sent) == ex[0][name]["t1_bytes"] == ex[0][name]["fmt_bytes"], (name, sent)
            assert sent[0] == sent[1], (name, sent)



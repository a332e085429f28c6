"""What the vocabulary-parallel checks assert, shared by the threaded (unit) and the launched (dist)
runs of the same matrix (tests/workers/vocab_parallel_check.py computes it)."""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Callable

import torch

from codistill_ds.exchange import vocab as vp
from launch import WORKERS

_spec = importlib.util.spec_from_file_location("vocab_parallel_check", WORKERS / "vocab_parallel_check.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

TOL = 1e-6  # fp32: |value - ref| <= TOL * max(1, |ref|), |grad - ref grad| <= TOL
WIRE_REL = {"fp32": 1e-6, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10, "fp8": 2.0 ** -3}  # one wire step


# --------------------------------------------------------------------------- T ranks on threads

class _Board:
    def __init__(self, size: int) -> None:
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=120)


class ThreadComm(vp.TPComm):
    """T ranks of a TP group as T threads of this process; sums in rank order."""

    def __init__(self, board: _Board, rank: int) -> None:
        self.board, self.size, self.rank = board, board.size, rank

    def _swap(self, x):
        b = self.board
        b.slots[self.rank] = x
        b.barrier.wait()
        out = list(b.slots)
        b.barrier.wait()
        return out

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        parts = self._swap(t.detach().clone())
        acc = parts[0].clone()
        for p in parts[1:]:
            acc = acc + p if op == "sum" else torch.maximum(acc, p)
        return t.copy_(acc)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [p.clone() for p in self._swap(t.detach().clone())]

    def all_to_all(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        got = self._swap([p.detach().clone() for p in parts])
        return [got[j][self.rank].clone() for j in range(self.size)]


def on_threads(T: int, fn: Callable[[ThreadComm], object]) -> list:
    board, results, errors = _Board(T), [None] * T, []

    def work(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(board, rank))
        except BaseException as e:  # noqa: BLE001 - re-raised below, after every thread ends
            errors.append(e)
            board.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(T)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- assertions on a matrix

def assert_student(ranks: list[dict]) -> None:
    """One TP group's per-rank "student" results: every case within TOL, the same scalar on
    every TP rank, and every kind / setting present."""
    cases = ranks[0]["student"]
    assert len(cases) == 4 * (4 * 2 + 1) * 2 * 2 + 1 + 4, len(cases)
    for name, c in cases.items():
        for r in ranks:
            got = r["student"][name]
            assert got["value_err"] <= TOL * max(1.0, abs(got["ref"])), (name, got)
            assert got["grad_err"] <= TOL, (name, got)
            assert got["got"] == c["got"], (name, "loss differs across TP ranks")
        assert math.isfinite(c["ref"]) and c["grad_scale"] > 0, name


def assert_agreement(ranks: list[dict]) -> None:
    for r in ranks:
        a = r["agreement"]
        assert a["argmax_equal"]
        for name, pair in a.items():
            if name != "argmax_equal":
                assert pair[1] == pair[0], (name, pair)
    assert ranks[0]["agreement"]["self/masked"][0] == [9, 9]  # agreement with its own top-k: all kept tokens


def assert_teacher(ranks: list[dict]) -> None:
    T = len(ranks)
    teacher = ranks[0]["teacher"]
    for name, c in teacher.items():
        if name == "samples" or name.startswith("ties"):
            continue
        fmt = W.FORMATS[name.split("/", 1)[1]]
        for r in ranks:
            got = r["teacher"][name]
            assert got["digest"] == c["digest"], (name, "payload differs across TP ranks")
            assert got["ids_equal"] and got["fmt_equal"], (name, got)
            assert got["value_rel"] <= WIRE_REL[fmt[0]], (name, got)
            if fmt[3] == "logits" or fmt[2] == 0:  # no log-sum-exp in them: bit-identical
                assert got["bits_differ"] == 0, (name, got)
            assert got["compress_rows_equal"] and got["gather_rows_equal"], (name, got)
            assert sum(got["chunk_bytes"]) == got["bytes"], (name, got)
            if name.startswith("n12/"):
                assert got["chunk_bytes"] == [got["bytes"] // T] * T, (name, got)
    for name, c in teacher.items():
        if name.startswith("ties"):
            assert c["values_equal"] and c["values_at_ids_equal"] and c["lowest_id_rule"], (name, c)
            assert all(r["teacher"][name]["digest"] == c["digest"] for r in ranks), name
    s = teacher["samples"]
    assert s["same_ids_as_T1"] and s["ids_in_range"] and s["fmt_vocab"] == W.V, s
    assert s["value_err"] <= 1e-6, s
    assert s["max_abs_z"] < 5.0, s  # 40,000 draws over 48 ids against p: no bin off by 5 sigma
    assert all(r["teacher"]["samples"]["digest"] == s["digest"] == r["teacher"]["samples"]["digest_other_seeds"]
               for r in ranks), "sampled payload differs across TP ranks or depends on their seeds"


def assert_guards(ranks: list[dict]) -> None:
    for r in ranks:
        for name, outcome in r["guards"].items():
            assert outcome.startswith(("TypeError", "ValueError")), (name, outcome)


def assert_matrix(ranks: list[dict]) -> None:
    assert_student(ranks)
    assert_agreement(ranks)
    assert_teacher(ranks)
    assert_guards(ranks)


# --------------------------------------------------------------------------- acceptance: real ranks

"""The critical-batch benchmark (`python -m benchmarks.onepass`): its estimators against values
computed another way, and its smoke ladder end to end (real training, tiny model).

- The two-batch noise-scale estimator is unbiased: averaged over every possible batch drawn
  with replacement from a finite population of gradients, it gives the population's |G|^2 and
  tr(Sigma) exactly.
- The McCandlish fit recovers S_min, E_min and B_crit from points on the curve.
- The smoke ladder: every batch of the ladder trains; no run reads a training window twice
  (checked on the windows the library's stream really delivers); the first step's loss and
  gradient norms equal those recomputed one sequence at a time; the JSON has its fields;
  a rerun trains nothing.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.onepass import lib
from benchmarks.onepass.estimate import (
    crossing,
    doubling_ratios,
    fit_critical_batch,
    noise_scale,
    two_batch_terms,
)
from benchmarks.onepass.settings import MODES, RunSpec, center_j, next_lr
from benchmarks.onepass.trainer import config_of, corpus_of

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("k", [1, 2])
def test_two_batch_estimator_is_exact_in_expectation(k: int) -> None:
    """Batches of 2k gradients drawn with replacement from N, halves of k: the mean of the
    estimates over all N^(2k) equally likely batches is the population's |mean|^2 and trace of
    covariance (1/N normalization), hand-computed from the population."""
    rng = np.random.default_rng(0)
    n, dim = 4, 3
    pop = rng.normal(size=(n, dim)) + np.array([0.5, -1.0, 2.0])
    mu = pop.mean(0)
    want_g2 = float(mu @ mu)
    want_tr = float(((pop - mu) ** 2).sum(1).mean())
    g2s, trs = [], []
    for idx in itertools.product(range(n), repeat=2 * k):
        a, b = pop[list(idx[:k])].mean(0), pop[list(idx[k:])].mean(0)
        small = 0.5 * (a @ a + b @ b)
        big = ((a + b) / 2) @ ((a + b) / 2)
        g2, tr = two_batch_terms(small, big, k, 2 * k)
        g2s.append(g2)
        trs.append(tr)
    assert np.mean(g2s) == pytest.approx(want_g2, rel=1e-12)
    assert np.mean(trs) == pytest.approx(want_tr, rel=1e-12)
    assert noise_scale(sum(g2s), sum(trs)) == pytest.approx(want_tr / want_g2, rel=1e-12)


def test_noise_scale_of_a_gradient_lost_in_noise_is_infinite() -> None:
    assert noise_scale(0.0, 1.0) == math.inf
    with pytest.raises(ValueError):
        two_batch_terms(1.0, 1.0, 4, 4)


def test_fit_recovers_the_critical_batch() -> None:
    s_min, e_min = 300.0, 24_000.0  # B_crit = 80
    batches = [4, 8, 16, 32, 64, 128, 256]
    steps = [s_min * (1 + (e_min / s_min) / b) for b in batches]
    fit = fit_critical_batch(batches, steps)
    assert fit["S_min"] == pytest.approx(s_min, rel=1e-9)
    assert fit["E_min"] == pytest.approx(e_min, rel=1e-9)
    assert fit["B_crit"] == pytest.approx(80.0, rel=1e-9)
    assert fit["max_rel_residual"] < 1e-9
    for b, s in zip(batches, steps):  # the paper's form of the same curve
        assert (s / s_min - 1) * (b * s / e_min - 1) == pytest.approx(1.0, rel=1e-9)
    ratios = {d["batch"]: d["ratio"] for d in doubling_ratios(batches, steps)}
    assert ratios[64] == pytest.approx((1 + 80 / 64) / (1 + 80 / 128))


def test_crossing_interpolates_in_log_step() -> None:
    curve = [(0, 5.5), (8, 3.0), (32, 2.0), (64, 1.5)]
    # between (8, 3.0) and (32, 2.0): 2.5 is half way in loss, so half way in log step: 16
    assert crossing(curve, 2.5) == pytest.approx(16.0)
    assert crossing(curve, 2.0) == pytest.approx(32.0)
    assert crossing(curve, 1.0) is None
    assert crossing([(8, 1.0)], 2.0) == 8.0


def test_learning_rate_search_finds_the_grid_minimum() -> None:
    """Steps to target a parabola in the grid index with its minimum 3 steps above the first
    guess: the search extends past the edge and stops at the minimum's sqrt(2) neighbours."""
    mode = MODES["quick"]
    c = center_j(mode, 32)
    best_j = c + 3

    def steps(j: int) -> float:
        return 100.0 + 10.0 * (j - best_j) ** 2

    tried: dict[int, float | None] = {}
    while (j := next_lr(mode, 32, tried)) is not None:
        tried[j] = steps(j)
    assert min(tried, key=tried.get) == best_j
    assert {best_j - 1, best_j + 1} <= set(tried)
    assert len(tried) <= mode.max_lrs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onepass")
    assert "training G=" in bench("--out", str(out))
    return out


def bench(*args: str) -> str:
    """`python -m benchmarks.onepass --smoke ARGS` in this process (the tiny runs cost less than a
    new interpreter's imports); its stdout."""
    from benchmarks.onepass.__main__ import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--smoke", *args]) == 0
    return buf.getvalue()


def _runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_smoke_results_have_their_fields(smoke: Path) -> None:
    res = json.loads((smoke / "results.json").read_text())
    mode = MODES["smoke"]
    for field in ("command", "mode", "model", "corpus", "targets", "ladder", "fit", "doubling", "noise", "runs", "curves"):
        assert field in res, field
    assert res["targets"] == sorted(mode.targets, reverse=True)
    for t in res["ladder"]:
        rows = res["ladder"][t]
        assert [r["batch"] for r in rows] == list(mode.batches)
        for r in rows:
            assert r["steps"] is not None and r["steps"] > 0, (t, r)
            assert r["tokens"] == pytest.approx(r["steps"] * r["batch"] * mode.seq_len)
        fit = res["fit"][t]
        assert fit["B_crit"] == pytest.approx(fit["E_min"] / fit["S_min"])
        assert res["noise"][t]["pooled_b_simple"] is not None
    assert (smoke / "results.md").read_text().count("| batch (seq)") == len(mode.targets)
    assert (smoke / "onepass.png").stat().st_size > 10_000
    for run in _runs(smoke):
        assert run["done"] and run["stop"] in ("target", "slower", "one-pass", "diverged")
        steps = [e["step"] for e in run["evals"]]
        assert steps == sorted(steps) and steps[-1] == run["steps_run"]
        for t, got in run["crossings"].items():  # interpolated between the bracketing evaluations
            above = [e for e in run["evals"] if e["step"] < got["steps"]]
            assert all(e["val_loss"] > float(t) for e in above), (t, got)


def test_no_run_reads_a_window_twice(smoke: Path) -> None:
    """The windows the library's stream delivers for each run's steps, matched to the corpus by
    content: no content is delivered more often than the training split holds it."""
    runs = _runs(smoke)
    assert runs
    corpus = None
    for run in runs:
        spec = RunSpec(**{**run["spec"], "betas": tuple(run["spec"]["betas"]),
                          "targets": tuple(run["spec"]["targets"])})
        assert run["windows_read"] == run["steps_run"] * spec.batch <= run["train_windows"]
        corpus = corpus or corpus_of(config_of(spec))
        held = collections.Counter(row.numpy().tobytes() for row in corpus.train)
        stream = lib.TrainStream(corpus, spec.seed, 0, 1, 0, 1, spec.batch // 2, 2)
        seen: collections.Counter = collections.Counter()
        for step in range(run["steps_run"]):
            for m in range(2):
                seen.update(row.numpy().tobytes() for row in stream.micro_batch(step, m))
        assert sum(seen.values()) == run["windows_read"]
        assert all(count <= held[key] for key, count in seen.items())


def test_first_step_equals_per_sequence_recomputation(smoke: Path) -> None:
    """Loss and the two squared gradient norms of a run's first step, recomputed from the
    gradients of single sequences at the same initialization (the batch mean gradient is the
    mean of the sequences' gradients: every sequence has seq_len targets)."""
    run = next(r for r in _runs(smoke) if r["spec"]["batch"] == 4)
    spec = RunSpec(**{**run["spec"], "betas": tuple(run["spec"]["betas"]), "targets": tuple(run["spec"]["targets"])})
    cfg = config_of(spec)
    corpus = corpus_of(cfg)
    torch.set_num_threads(1)
    model = lib.build_model(cfg.model, corpus.vocab_size, 0.0, spec.seed)
    model.train()
    stream = lib.TrainStream(corpus, spec.seed, 0, 1, 0, 1, spec.batch // 2, 2)
    seqs = torch.cat([stream.micro_batch(0, 0), stream.micro_batch(0, 1)])
    grads, losses = [], []
    for seq in seqs:
        model.zero_grad()
        logits = model(input_ids=seq[None, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), seq[None, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    g = torch.stack(grads)
    half = spec.batch // 2
    a, b = g[:half].mean(0), g[half:].mean(0)
    small = 0.5 * (a.dot(a) + b.dot(b)).item()
    big = ((a + b) / 2).dot((a + b) / 2).item()
    first = run["first_step"]
    assert first["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert first["g_small_sq"] == pytest.approx(small, rel=1e-4)
    assert first["g_big_sq"] == pytest.approx(big, rel=1e-4)


def test_rerun_reuses_finished_runs(smoke: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (smoke / "runs").glob("*.json")}
    assert "training G=" not in bench("--out", str(smoke))
    assert {p.name: p.stat().st_mtime_ns for p in (smoke / "runs").glob("*.json")} == before


def test_a_probe_run_serves_as_the_ladder_run_of_its_settings(tmp_path: Path) -> None:
    """`--probe` trains one whole pass without a target; the ladder then reads that run for the
    same batch and learning rate instead of training it again, its crossings taken from the
    probe's curve. On 20 KB (the smoke mode cut: a whole pass is 144 updates)."""
    from dataclasses import replace

    from benchmarks.onepass.ladder import Ladder, probe

    mode = replace(MODES["smoke"], max_bytes=20_000, val_windows=16)
    logs: list[str] = []
    probe(mode, tmp_path, 1234, [4], log=logs.append)
    rec = json.loads(next((tmp_path / "probe").glob("G0004-*.json")).read_text())
    assert rec["stop"] == "one-pass" and rec["steps_run"] == rec["max_steps"]
    assert rec["windows_read"] <= rec["train_windows"]
    Ladder(mode, tmp_path, 1234, [4], log=logs.append).search()
    assert any("read from its probe run" in line for line in logs)
    run = json.loads((tmp_path / "runs" / next((tmp_path / "probe").glob("G0004-*.json")).name).read_text())
    curve = [(e["step"], e["val_loss"]) for e in rec["evals"]]
    for t in mode.targets:
        got = crossing(curve, t)
        assert run["crossings"].get(f"{t:g}", {}).get("steps") == (None if got is None else pytest.approx(got))

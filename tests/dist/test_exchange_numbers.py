"""Real runs whose exchange numbers are rebuilt another way (issue 24).

One module-scoped set of three launches of the CLI's training (`run`), two at a time:
  T    3 groups x 1 rank, FSDP2, `exchange_batch: train`, alpha 1, reverse KL, peer weights
       {1: 3, 2: 0} (the same list in every group: group 0 ignores peer 2, group 1 ignores
       peer 2, group 2 weighs peer 1 three times peer 0), under tests/workers/probe_run.py,
       which rebuilds each step's distillation term, agreement and teacher inputs by hand
  ACCUM  one 2-rank launch of tests/workers/train_runs.py: the CLI's training five times, one
       run after the other (a rank start costs more CPU than these runs):
       A1, A2, A4   2 groups x 1 rank, ZeRO-3, alpha 1 from step 0: one micro-batch of 4
                    sequences, 2 of 2 (train.grad_accum 2), 4 of 1 (grad_accum 4)
       F1, F4       the same on FSDP2 (its accumulation is the backend's own) with JSD: 1 x 4, 4 x 1
  TF   2 groups x 1 rank, DeepSpeed ZeRO-1, `exchange_batch: train` with token_fraction 0.5:
       the peers predict on the first half of my micro-batch of 4, whole sequences
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import REPO, WORKERS, read_jsonl, torchrun

pytestmark = pytest.mark.timeout(600)

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
PROBE = str(WORKERS / "probe_run.py")


def probe_run(out: Path, nproc: int, *overrides: str, **env: str) -> dict:
    """tests/workers/probe_run.py on nproc ranks; metrics records by (group, step) and each
    rank's probe."""
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun(nproc, [PROBE, str(out), CONFIG, f"run_dir={out / 'run'}", *overrides], timeout=420,
                    PROBE_DIR=str(out), **env)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"records": {(r["group"], r["step"]): r for r in read_jsonl(out / "run" / "metrics.jsonl")},
            "probes": [json.loads((out / f"probe_rank{r}.json").read_text()) for r in range(nproc)]}


TRAIN_STEPS = 6
WEIGHTS = {1: 3.0, 2: 0.0}
ACCUM_STEPS = 8
ACCUM = {"A1": ("deepspeed", 4, 1, "kl"), "A2": ("deepspeed", 2, 2, "kl"), "A4": ("deepspeed", 1, 4, "kl"),
         "F1": ("fsdp", 4, 1, "jsd"), "F4": ("fsdp", 1, 4, "jsd")}
"""name: (backend, micro-batch, accumulation, loss): every run trains on 4 sequences per step;
the FSDP2 pair distills with JSD, so that loss's gradient runs end to end against a reference."""


def accum_sets(backend: str, micro: int, accum: int, loss: str) -> list[str]:
    """The CLI's overrides with the distillation term on from step 0 (a fixed exchange batch of 4
    and the same 4 validation windows, so only the split of the training batch differs between runs)."""
    return [f"backend.name={backend}", f"data.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"data.val_batches={4 // micro}",  # validation reads val_batches x micro windows: the same 4
            "data.exchange_batch_size=4", "codistill.alpha=1", f"codistill.loss={loss}", f"train.steps={ACCUM_STEPS}",
            f"train.eval_interval={ACCUM_STEPS}"]


def accum_runs(tmp: Path) -> dict[str, dict]:
    """Every ACCUM run in one 2-rank launch (tests/workers/train_runs.py: the CLI's training, run
    after run, each with its own run dir TMP/NAME, groups and replica); metrics records by (group, step)."""
    argv = [str(WORKERS / "train_runs.py"), str(tmp), CONFIG]
    for name, spec in ACCUM.items():
        argv += [f"@{name}", *accum_sets(*spec)]
    proc = torchrun(2, argv, timeout=560)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {name: {(r["group"], r["step"]): r for r in read_jsonl(tmp / name / "metrics.jsonl")} for name in ACCUM}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("numbers")
    with ThreadPoolExecutor(2) as pool:
        jobs = {"T": pool.submit(probe_run, tmp / "T", 3, "backend.name=fsdp", "codistill.groups=3",
                                 "codistill.exchange_batch=train", "codistill.alpha=1", "codistill.loss=reverse_kl",
                                 "codistill.peer_weights=[[1, 3.0], [2, 0.0]]", f"train.steps={TRAIN_STEPS}",
                                 PROBE_FORWARD="1"),
                "ACCUM": pool.submit(accum_runs, tmp),
                "TF": pool.submit(probe_run, tmp / "TF", 2, "backend.ds_config=ds_configs/zero1.json",
                                 "codistill.exchange_batch=train", "codistill.alpha=1", "codistill.token_fraction=0.5",
                                 "data.micro_batch_size=4", f"train.steps={TRAIN_STEPS}", PROBE_FORWARD="1")}
        out = {name: job.result() for name, job in jobs.items()}
    return {**out.pop("ACCUM"), **out}


def test_train_batches_and_peer_weights_against_a_hand_run_reference(runs):
    """Issue 24, item 2 and item 4 (row `test_heterogeneous`): `exchange_batch: train` and peer
    weights with two peers and a 0, on real ranks. Every step of every group:
      - my teacher predicted on exactly my peers' first micro-batches of the step, in group
        order (rebuilt from a corpus and streams of the probe's own);
      - the student is my own first micro-batch (a forward of it alone gives the same logits);
      - the logged distillation term equals the hand-weighted mean of each peer's divergence
        alone (weights 1, 3 and 0: group 2's term is (D_0 + 3 D_1) / 4, the others distill
        from one peer), and `peers` counts the weighted peers only;
      - the agreement is the student's top-1 against the peers' sent top-1, counted by hand."""
    t = runs["T"]
    for g, probe in enumerate(t["probes"]):
        assert len(probe["sent"]) == TRAIN_STEPS and all(s["same_tokens"] for s in probe["sent"]), probe["sent"]
        expected_peers = [h for h in range(3) if h != g and WEIGHTS.get(h, 1.0) > 0]
        assert [d["peer_groups"] for d in probe["due"]] == [expected_peers] * TRAIN_STEPS
        assert all(d["own"] and d["exchange"] == d["step"] for d in probe["due"])
        assert len(probe["terms"]) == TRAIN_STEPS
        for term in probe["terms"]:
            assert term["got"] == pytest.approx(term["ref"], rel=1e-6, abs=1e-7), (g, term)
            assert term["forward_gap"] < 1e-5, (g, term)
        agreement = {a["step"]: a["value"] for a in probe["agreement"]}
        for term in probe["terms"]:
            agree, count = term["agree_count"]
            assert agreement[term["step"]] == pytest.approx(agree / count, abs=1e-12), (g, term)
        for step in range(1, TRAIN_STEPS + 1):
            rec = t["records"][(g, step)]
            assert rec["peers"] == len(expected_peers)
            assert rec["distill_loss"] == pytest.approx(probe["terms"][step - 1]["got"], rel=1e-6)
    # Group 2's term by hand from its two peers' divergences: (1 x D_0 + 3 x D_1) / 4, which the
    # plain mean is not.
    for term in t["probes"][2]["terms"]:
        d = {g: value for _, g, value in term["each"]}
        assert sorted(d) == [0, 1]
        assert term["got"] == pytest.approx((d[0] + 3 * d[1]) / 4, rel=1e-6)
        assert abs(term["got"] - (d[0] + d[1]) / 2) > 1e-4 * term["got"], term
    last = t["probes"][2]["terms"][-1]
    print(f"\nT: group 2 step {TRAIN_STEPS} D = {last['got']:.6f} = (D_0 {last['each'][0][2]:.6f} + 3 x D_1 "
          f"{last['each'][1][2]:.6f}) / 4")


@pytest.mark.parametrize("run, ref", [("A2", "A1"), ("A4", "A1"), ("F4", "F1")])
def test_accumulation_trains_what_one_large_micro_batch_trains(runs, run, ref):
    """Issue 24, item 1: gradient accumulation with the distillation term. The loop adds the
    term once per optimizer step, on the first micro-batch, times the accumulation count
    (the backends average micro-steps): with it right, 2 x 2 and 4 x 1 give the gradients of
    one micro-batch of 4, so every step's loss, distillation loss and the final validation loss
    match the single micro-batch run (fp32; seen: loss <= 8.4e-7, distillation loss <= 6.2e-8). The factor off by the accumulation
    count would change the distillation gradient's share and the weights from step 2 on (the
term without the factor: losses off by 4.7e-4 at step 3)."""
    a, b = runs[run], runs[ref]
    assert a.keys() == b.keys() and len(a) == 2 * ACCUM_STEPS
    worst = 0.0
    for key in sorted(b):
        assert a[key]["distill_loss"] is not None and a[key]["distill_loss"] > 0, key
        for field, tol in (("loss", 1e-5), ("distill_loss", 1e-6), ("val_loss", 1e-5)):
            if b[key].get(field) is None:
                continue
            diff = abs(a[key][field] - b[key][field])
            worst = max(worst, diff)
            assert diff <= tol, (run, key, field, a[key][field], b[key][field])
    print(f"\n{run} vs {ref}: max |difference| over {ACCUM_STEPS} steps x 2 groups: {worst:.2e}")


def test_train_batch_token_fraction_sends_whole_leading_sequences(runs):
    """`exchange_batch: train` with token_fraction 0.5 and a micro-batch of 4: my teacher predicts
    on exactly the first 2 sequences of my peer's first micro-batch (the forward shrinks with the
    fraction), the student is the first 2 rows of my own (a forward of them alone gives the same
    logits), the term equals the hand-built one, and half the bytes of the full batch travel."""
    from codistill_ds.exchange.wire import WireFormat

    f = runs["TF"]
    for g, probe in enumerate(f["probes"]):
        assert len(probe["sent"]) == TRAIN_STEPS and all(s["same_tokens"] for s in probe["sent"]), probe["sent"]
        assert len(probe["terms"]) == TRAIN_STEPS
        for term in probe["terms"]:
            assert term["got"] == pytest.approx(term["ref"], rel=1e-6, abs=1e-7), (g, term)
            assert term["forward_gap"] < 1e-5, (g, term)
        per_step = 2 * 32 * WireFormat.choose(8, 256, "bf16").bytes_per_token  # 2 rows of seq_len positions
        assert f["records"][(g, TRAIN_STEPS)]["cross_group_bytes"] == TRAIN_STEPS * per_step

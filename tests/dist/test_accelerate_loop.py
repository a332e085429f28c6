"""A user's own Accelerate loop codistills (`integrations/accelerate_loop.py`): the example
script, examples/accelerate_loop.py, under `accelerate launch` with launch/accelerate/zero3.yaml
at 2 groups x 2 ranks (4 processes, CPU, gloo), side by side with its `--plain` mode (no
launcher, no DeepSpeed, no codistillation: the same loop, group g's rows, S x the batch), both
groups' plain references one after the other in one process.

One launch checks: every parameter is partitioned 1/2, over the group (the global-mpu trap would
give 1/4 or one shared model); the groups, started from the same weights (`--same_init`), end
with different ones; alpha is 0 during burn-in, then the distillation loss is > 0; no loss is
NaN; and while alpha = 0 each group's losses equal its plain reference's to 1e-5, which checks
the group's seed, its data shard and order, and the in-group sharding at once. The codistilling
run checkpoints activations (`Codistill.checkpoint_activations`, "full": every block) and the
plain one does not, so the same comparison shows that checkpointing leaves the losses unchanged.

Beside it, in the same launch, the example as one job per group (`--transport torchft`, a real
Lighthouse, 2 ranks per job under `accelerate launch --num_processes 2`): every group's logged
loss, distillation loss, alpha, peers and bytes equal the one-job run's to 1e-6.

ZeRO-3 only, to keep to one launch: ZeRO-2 through the same hook (`engines_in_group`) runs in
tests/dist/test_hf_stock_script.py (the Trainer). FSDP2 through Accelerate cannot run on CPU:
Accelerate 1.15 enables FSDP for accelerator process types only (under
launch/accelerate/fsdp2.yaml on CPU it reports distributed type NO); `check_fsdp_in_group` is
tested directly in tests/workers/group_sharding_check.py.

Accumulation and resume (tests/workers/accelerate_accum.py, 2 groups x 1 rank): one launch
trains L1, L2 and L4 one after the other, each from scratch; a second launch resumes LR from
L1's checkpoint in fresh processes. Launches: 4 + 1 + 2 x 2 ranks side by side, then 2, then 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from partitions import assert_sharded_within_groups

from launch import REPO, WORKERS, child_env, run_captured

STEPS, BURN_IN, BATCH, S, K = 8, 4, 2, 2, 2
COMMON = ["--steps", str(STEPS), "--burn_in", str(BURN_IN), "--interval", "2", "--same_init",
          "--max_bytes", "40000", "--seq_len", "32"]
WORKER = str(WORKERS / "accelerate_loop_run.py")


def run(argv: list[str], timeout: float = 480) -> subprocess.CompletedProcess:
    """Past `timeout` every rank is stopped, not only the launcher (no orphan left behind)."""
    return run_captured(argv, timeout, cwd=REPO, env=child_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accel_loop")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--config_file", "launch/accelerate/zero3.yaml", WORKER, str(tmp / "codistill"),
              *COMMON, "--groups", str(K), "--batch_size", str(BATCH), "--activation_checkpointing", "full"]
    # Both groups' references, one after the other in one process (runs TMP/plain{g}).
    plain = [sys.executable, WORKER, str(tmp), *COMMON, "--plain", "--num_shards", str(K), "--batch_size", str(BATCH * S)]
    for g in range(K):
        plain += [f"@plain{g}", "--data_shard", str(g)]
    from codistill_ds.commands.lighthouse import start_lighthouse

    server, url = start_lighthouse(port=0, bind="127.0.0.1", join_timeout_ms=60000)
    ft = {f"ft{g}": [accelerate, "launch", "--config_file", "launch/accelerate/zero3.yaml", "--num_processes", str(S),
                     WORKER, str(tmp / f"ft{g}"), *COMMON, "--groups", str(K), "--batch_size", str(BATCH),
                     "--transport", "torchft", "--group_id", str(g), "--lighthouse", url] for g in range(K)}
    try:
        with ThreadPoolExecutor(2 + K) as pool:
            jobs = {"codistill": pool.submit(run, launch), "plain": pool.submit(run, plain),
                    **{name: pool.submit(run, argv) for name, argv in ft.items()}}
            procs = {name: job.result() for name, job in jobs.items()}
    finally:
        server.shutdown()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    codistill = [json.loads((tmp / "codistill" / f"rank{r}.json").read_text()) for r in range(K * S)]
    torchft = {g: [json.loads((tmp / f"ft{g}" / f"rank{r}.json").read_text()) for r in range(S)] for g in range(K)}
    return codistill, {g: json.loads((tmp / f"plain{g}" / "rank0.json").read_text()) for g in range(K)}, torchft


@pytest.mark.timeout(900)
def test_own_accelerate_loop_codistills_inside_groups(runs):
    ranks, plain, _ = runs
    assert [r["dp_world_size"] for r in ranks] == [S] * (K * S)
    assert all(r["checkpointed"] == [0, 1] for r in ranks)  # both blocks recompute (the tiny Llama has 2)
    assert all(p["checkpointed"] == [] for p in plain.values())
    assert [(r["group"], r["group_rank"]) for r in ranks] == [(g, i) for g in range(K) for i in range(S)]
    assert_sharded_within_groups(ranks, S=S)  # every parameter 1/2, groups end with different weights

    for g in range(K):
        logs = [r["logs"] for r in ranks if r["group"] == g]
        assert _group_figures(logs[0]) == _group_figures(logs[1])  # one value per group, on each rank
        records = logs[0]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert all(math.isfinite(r["loss"]) for r in records)
        assert all(r["alpha"] == 0 for r in records[:BURN_IN])
        after = records[BURN_IN:]
        assert all(r["alpha"] > 0 and r["distill_loss"] > 0 and math.isfinite(r["distill_loss"]) for r in after)
        assert records[-1]["cross_group_bytes"] > 0 and records[-1]["peers"] == K - 1

        reference = [r["loss"] for r in plain[g]["logs"]]
        mine = [r["loss"] for r in records]
        # Losses up to and including step BURN_IN come from weights trained with alpha = 0 only.
        assert mine[: BURN_IN + 1] == pytest.approx(reference[: BURN_IN + 1], abs=1e-5, rel=0), (g, mine, reference)
        # Afterwards the distillation term moves the weights: the comparison above is not vacuous.
        assert max(abs(a - b) for a, b in zip(mine[BURN_IN + 1:], reference[BURN_IN + 1:])) > 1e-4, (mine, reference)
    assert plain[0]["checksum"] != plain[1]["checksum"]


@pytest.mark.timeout(900)
def test_own_loop_over_torchft_equals_one_job(runs):
    """Each group its own 2-rank job through the Lighthouse: the same figures as the one-job run."""
    ranks, _, torchft = runs
    worst = 0.0
    for g in range(K):
        world = [r for r in ranks if r["group"] == g]
        ft = torchft[g]
        assert [r["group"] for r in ft] == [g] * S and [r["dp_world_size"] for r in ft] == [S] * S
        for w_rank, f_rank in zip(world, ft):
            assert len(f_rank["logs"]) == STEPS
            for w, f in zip(w_rank["logs"], f_rank["logs"]):
                assert (w["step"], w["alpha"], w.get("peers"), w["cross_group_bytes"]) == (
                    f["step"], f["alpha"], f.get("peers"), f["cross_group_bytes"]), (g, w, f)
                for key in ("loss", "distill_loss"):
                    assert (key in w) == (key in f), (g, key)
                    if key in w:
                        worst = max(worst, abs(w[key] - f[key]))
                        assert abs(w[key] - f[key]) <= 1e-6, (g, w["step"], key, w[key], f[key])
        assert world[0]["checksum"] == pytest.approx(ft[0]["checksum"], abs=1e-6)
        assert ft[0]["logs"][-1]["peers"] == K - 1 and ft[0]["logs"][-1]["distill_loss"] > 0
    print(f"\nown loop, torchft (2 jobs x {S} ranks) vs one job: max |loss or distill_loss difference| {worst:.1e}")


def _group_figures(records: list[dict]) -> list[tuple]:
    """What `log_metrics` averages over the group (bytes and timings are each rank's own)."""
    return [(r["step"], r["group"], r["loss"], r["alpha"], r["distill_loss"]) for r in records]


# ---- accumulation and resume in the own loop (issue 24, items 1 and 7) -----------------------------

ACCUM_WORKER = str(WORKERS / "accelerate_accum.py")
ACCUM = {"L1": (4, 1), "L2": (2, 2), "L4": (1, 4)}
"""name: (rows per micro-batch, accumulation): 4 rows per optimizer step in each."""
SAVE_AT, ACCUM_STEPS = 3, 6


def accum_launch(out: Path, *args: str) -> Path:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = run([accelerate, "launch", "--config_file", "launch/accelerate/zero3.yaml", "--num_processes", "2",
                ACCUM_WORKER, str(out), "--steps", str(ACCUM_STEPS), "--staleness", "1", *args], timeout=600)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def own_loop(tmp_path_factory):
    """2 groups x 1 rank, ZeRO-3, alpha 1 from step 0, exchanges consumed one step late. One
    launch trains L1, L2 and L4 one after the other (each run from scratch: a new Accelerator,
    engine and `Codistill`); L1 saves after SAVE_AT steps and trains on. A second launch, fresh
    processes, resumes LR from L1's checkpoint."""
    tmp = tmp_path_factory.mktemp("own_loop")
    runs = ",".join(f"{name}={b}x{a}" for name, (b, a) in ACCUM.items())
    accum_launch(tmp / "accum", "--runs", runs, "--save_at", str(SAVE_AT), "--save_run", "L1")
    accum_launch(tmp / "resume", "--runs", "LR=4x1", "--save_at", str(SAVE_AT), "--resume",
                 str(tmp / "accum" / "L1" / "ckpt"))
    out = {name: tmp / "accum" / name for name in ACCUM} | {"LR": tmp / "resume" / "LR"}
    return {name: [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
            for name, folder in out.items()}


@pytest.mark.timeout(900)
def test_own_loop_runs_use_their_accumulation(own_loop):
    """Each run of the shared launch trained with its own micro-batch and accumulation count, in
    Accelerate and in the DeepSpeed engine (not the first run's, left in Accelerate's state)."""
    for name, (batch, accum) in {**ACCUM, "LR": (4, 1)}.items():
        for rank in own_loop[name]:
            assert rank["accum"] == [accum, accum] and rank["micro_batch"] == batch, (name, rank["accum"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["L2", "L4"])
def test_own_loop_accumulation_trains_what_one_large_micro_batch_trains(own_loop, name):
    """`Codistill.distill` adds the term on the first micro-batch of a step, times Accelerate's
    accumulation count (DeepSpeed averages micro-batches): 2 x 2 and 4 x 1 give each group the
    losses, distillation losses and final weights of one micro-batch of 4 (without the factor:
    the loss is off by 1.7e-5 at step 3 and more after)."""
    worst = 0.0
    for ref, got in zip(own_loop["L1"], own_loop[name]):
        assert [r["step"] for r in got["logs"]] == [r["step"] for r in ref["logs"]] == list(range(1, ACCUM_STEPS + 1))
        for a, b in zip(got["logs"], ref["logs"]):
            assert b["alpha"] == 1.0
            assert (a.get("distill_loss") is None) == (b.get("distill_loss") is None)
            for key, tol in (("loss", 5e-6), ("distill_loss", 1e-6)):  # seen: 9.5e-7 (2 ulp of a loss of 5)
                if b.get(key) is None:
                    continue
                diff = abs(a[key] - b[key])
                worst = max(worst, diff)
                assert diff <= tol, (name, ref["group"], b["step"], key, a[key], b[key])
        assert sum(r.get("distill_loss") is not None and r["distill_loss"] > 0 for r in ref["logs"]) >= ACCUM_STEPS - 1
        assert abs(got["checksum"] - ref["checksum"]) <= 1e-4 * max(1.0, abs(ref["checksum"])), name
    print(f"\n{name} vs L1: max |difference| over {ACCUM_STEPS} steps x 2 groups: {worst:.2e}")


@pytest.mark.timeout(900)
def test_own_loop_resume_with_an_exchange_in_flight_ends_where_the_run_ends(own_loop):
    """`Codistill.state_dict` saved after step 3 holds the targets posted at step index 2 for
    step index 3 (staleness 1); the resumed run (Accelerate's state + that dict) logs steps 4..6
    exactly as the uninterrupted run, and ends with its weights."""
    for ref, got in zip(own_loop["L1"], own_loop["LR"]):
        assert [r["step"] for r in got["logs"]] == list(range(SAVE_AT + 1, ACCUM_STEPS + 1))
        after = {r["step"]: r for r in ref["logs"]}
        for rec in got["logs"]:
            for key in ("loss", "distill_loss", "agreement", "cross_group_bytes", "skipped_peers"):
                assert rec.get(key) == after[rec["step"]].get(key), (ref["group"], rec["step"], key)
        assert got["checksum"] == ref["checksum"]

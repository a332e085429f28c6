"""Hugging Face Trainer integration, end to end: C under the real `deepspeed` launcher, the
references and the other runs under torchrun (CPU, gloo).

One module-scoped set of launches, run side by side to keep the suite short:
  C      examples/hf_trainer_clm.py on 4 ranks = 2 groups x 2, ZeRO-3, alpha = 1 after a 3-step
         burn-in, exchange every 2 steps (at steps 1, 3, 5, so step 5 is the first to distill);
         every rank writes its ZeRO partition sizes, a weight checksum, the Trainer's batch
         bookkeeping and every log dict (--results-json)
  P0, P1 the same script with codistillation not installed (--codistill_enabled false): a plain 2-rank ZeRO-3
         Trainer on group g's data shard, the reference for group g
  F0, F1 the same script as one 2-rank job per group (transport torchft, a real Lighthouse): the
         reference is C, every logged figure equal
  H      tests/workers/group_sharding_check.py: the hooks themselves (FSDP2 mesh injection, the
         DeepSpeed mpu, the global-mpu trap) and the exchange-data check on 4 ranks
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from codistill_ds.distributed.launching import torchrun_argv
from launch import REPO, child_env, free_port, run_captured, run_worker

STEPS, BURN_IN, INTERVAL, S = 6, 3, 2, 2
FIRST_DISTILL = 5
"""Logged steps are 1-based; exchanges run at step indices 0, 2, 4 and alpha > 0 from index 3."""
TOL = 1e-5
COMMON = ["--deepspeed", "ds_configs/zero3.json", "--max_steps", str(STEPS), "--codistill_burn_in", str(BURN_IN),
          "--eval_steps", str(BURN_IN), "--max_bytes", "100000", "--codistill_interval", str(INTERVAL), "--codistill_topk", "8"]


def launcher(nproc: int, deepspeed: bool) -> list[str]:
    """The `deepspeed` launcher, or torchrun (the Trainer starts DeepSpeed either way; torchrun
    starts in half the CPU time, which the suite's references and accumulation runs take)."""
    if deepspeed:
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port())]
    return torchrun_argv(nproc, [])


def example(nproc: int, out: Path, *args: str, deepspeed: bool = False) -> list[dict]:
    """examples/hf_trainer_clm.py on nproc ranks; returns each rank's facts."""
    cmd = [*launcher(nproc, deepspeed), "examples/hf_trainer_clm.py", *COMMON, "--output_dir", str(out / "out"),
           "--results_json", str(out / "res"), *args]
    proc = run_captured(cmd, 600, cwd=REPO, env=child_env())  # a timeout stops every rank, not only the launcher
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out / "res" / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from codistill_ds.commands.lighthouse import start_lighthouse

    tmp = tmp_path_factory.mktemp("hf")
    server, url = start_lighthouse(port=0, bind="127.0.0.1", join_timeout_ms=60000)
    ft = ["--codistill_groups", "2", "--codistill_transport", "torchft", "--codistill_lighthouse", url]
    with ThreadPoolExecutor(6) as pool:
        jobs = {
            # One 2-rank Trainer job per group (transport torchft), C's settings otherwise.
            **{f"F{g}": pool.submit(example, S, tmp / f"F{g}", *ft, "--codistill_group_id", str(g)) for g in (0, 1)},
            "C": pool.submit(example, 4, tmp / "C", "--codistill_groups", "2", deepspeed=True),
            "P0": pool.submit(example, 2, tmp / "P0", "--codistill_enabled", "false", "--data_shard", "0",
                              "--num_shards", "2"),
            "P1": pool.submit(example, 2, tmp / "P1", "--codistill_enabled", "false", "--data_shard", "1",
                              "--num_shards", "2"),
            "H": pool.submit(run_worker, "group_sharding_check", 4, tmp / "H", timeout=600),
        }
        try:
            return {name: job.result() for name, job in jobs.items()}
        finally:
            server.shutdown()


def train_logs(rank_facts: dict) -> dict[int, dict]:
    return {log["step"]: log for log in rank_facts["logs"] if "loss" in log}


def eval_logs(rank_facts: dict) -> dict[int, float]:
    return {log["step"]: log["eval_loss"] for log in rank_facts["logs"] if "eval_loss" in log}


@pytest.mark.timeout(900)
def test_zero3_partitions_are_half_of_each_parameter(runs):
    """1/S of every parameter per rank (ZeRO-3 pads to S equal parts), not 1/world: the trap gives 1/4."""
    for facts in runs["C"]:
        for local, full in facts["parts"]:
            assert local == math.ceil(full / S), (facts["rank"], local, full)
    embed_local, embed_full = runs["C"][0]["parts"][0]
    print(f"\nembedding partition per rank: {embed_local} of {embed_full}")


@pytest.mark.timeout(900)
def test_groups_train_different_models(runs):
    c = runs["C"]
    assert c[0]["checksum"] == c[1]["checksum"] and c[2]["checksum"] == c[3]["checksum"]
    assert c[0]["checksum"] != c[2]["checksum"]
    assert [f["output_dir"].rsplit(os.sep, 1)[-1] for f in c] == ["group0", "group0", "group1", "group1"]
    assert [f["reports"] for f in c] == [True, False, True, False]  # each group's leader reports
    assert [f["saves"] for f in c] == [True, False, True, False]  # ... and saves (args.should_save)


@pytest.mark.timeout(900)
def test_batch_bookkeeping_is_group_sized(runs):
    """micro 2 x accumulation 1 x S 2, in the Trainer and in the DeepSpeed engine; group g trains on
    exactly the rows the plain run of shard g trains on."""
    for facts in runs["C"]:
        assert facts["total_train_batch_size"] == 4 and facts["engine_train_batch_size"] == 4
    assert runs["C"][0]["train_rows"] == runs["P0"][0]["train_rows"]
    assert runs["C"][2]["train_rows"] == runs["P1"][0]["train_rows"]


@pytest.mark.timeout(900)
def test_alpha_zero_reproduces_plain_trainer(runs):
    """While alpha(t) = 0 (burn-in; exchanges still run) each group's logged loss and eval loss equal
    a plain 2-rank Trainer's on that group's data, to 1e-5."""
    worst = 0.0
    for g, ref in ((0, runs["P0"][0]), (1, runs["P1"][0])):
        ours, plain = train_logs(runs["C"][2 * g]), train_logs(ref)
        for step in range(1, BURN_IN + 1):
            assert ours[step]["alpha"] == 0.0
            diff = abs(ours[step]["loss"] - plain[step]["loss"])
            worst = max(worst, diff)
            assert diff <= TOL, (g, step, ours[step]["loss"], plain[step]["loss"])
        eval_diff = abs(eval_logs(runs["C"][2 * g])[BURN_IN] - eval_logs(ref)[BURN_IN])
        assert eval_diff <= TOL, (g, eval_diff)
        worst = max(worst, eval_diff)
    print(f"\nmax |codistill(alpha=0) - plain| over {BURN_IN} steps x 2 groups + eval: {worst:.2e}")


@pytest.mark.timeout(900)
def test_distillation_after_burn_in_at_interval(runs):
    """Exchanges run every INTERVAL steps (bytes grow only then). After burn-in alpha = 1 and the
    logged distillation loss is non-zero; the loss stays the plain run's until the first step that
    has peer targets (step 4 has none: interval 2), then departs from it."""
    for g, ref in ((0, runs["P0"][0]), (1, runs["P1"][0])):
        ours, plain = train_logs(runs["C"][2 * g]), train_logs(ref)
        per_exchange = ours[1]["cross_group_bytes"]
        assert per_exchange > 0
        for step, log in ours.items():
            assert log["group"] == g
            assert log["cross_group_bytes"] == math.ceil(step / INTERVAL) * per_exchange, step
        for step in range(BURN_IN + 1, STEPS + 1):
            assert ours[step]["alpha"] == 1.0 and ours[step]["distill_loss"] > 0
        for step in range(1, FIRST_DISTILL):
            assert abs(ours[step]["loss"] - plain[step]["loss"]) <= TOL, (g, step)
        for step in range(FIRST_DISTILL, STEPS + 1):
            assert abs(ours[step]["loss"] - plain[step]["loss"]) > 1e-4, (g, step)
        assert 0.0 <= ours[STEPS]["agreement"] <= 1.0


@pytest.mark.timeout(900)
def test_engine_hooks_shard_inside_the_group(runs):
    """FSDP2 and DeepSpeed built the way Accelerate builds them (no mesh, no mpu) shard over S = 2;
    DeepSpeed's global `groups.mpu` shortcut partitions over the world and is refused. (The Trainer
    cannot run FSDP on CPU: Accelerate 1.15 enables FSDP only for accelerator processes.)"""
    for r in runs["H"]:
        assert r["fsdp_mesh_size"] == S and r["fsdp_local_rows"] * S == r["fsdp_rows"] and r["fsdp_restored"]
        on_world, left_out = r["fsdp_refused"]  # check_fsdp_in_group: every parameter, not the first
        assert on_world is not None and "of 4 ranks" in on_world, on_world
        assert left_out is not None and "(first: model.layers.1.self_attn.q_proj.weight, not sharded)" in left_out
        assert r["ds_dp_size"] == S and r["ds_local"] * S == r["ds_full"]
        assert r["ds_train_batch_size"] == r["ds_config_batch"] == 2 * 1 * S
        assert r["trap_dp_size"] == S and r["trap_local"] * 4 == r["ds_full"] and r["trap_caught"]
        # codistill.zero3_init(): zero.Init as Transformers calls it partitions in-group; without it,
        # a world-partitioned model is refused at engine creation.
        assert r["zinit_group_size"] == S and r["zinit_local"] * S == r["ds_full"] and r["zinit_restored"]
        assert r["zinit_world_caught"]
        assert r["gathered"] == [2.0 * r["group"], 2.0 * r["group"] + 1]
        assert r["shard_rows"] == r["list_rows"] == list(range(r["group"], 10, 2))
        assert r["loader"] == [[4 * i + 2 * r["group_rank"], 4 * i + 2 * r["group_rank"] + 1] for i in range(3)]


@pytest.mark.timeout(900)
def test_ranks_with_different_exchange_data_all_refuse(runs):
    """H, 2 groups x 2 ranks: rank 3 builds a different row 5; every rank raises the same error,
    which names the ranks on each side."""
    messages = {r["exchange_data_raised"] for r in runs["H"]}
    assert len(messages) == 1 and None not in messages, messages
    (message,) = messages
    assert "config field 'train_dataset'" in message, message
    assert "on ranks [0, 1, 2]" in message and "on ranks [3]" in message, message


@pytest.mark.timeout(900)
def test_one_trainer_job_per_group_over_torchft(runs):
    """Each group its own 2-rank Trainer job (transport torchft, ZeRO-3 inside the job): every
    logged figure of every rank equals the one-job run C's (losses to 1e-6), and each job writes
    output_dir/group{g}."""
    worst = 0.0
    for g in (0, 1):
        for r in range(S):
            facts, ref = runs[f"F{g}"][r], runs["C"][g * S + r]
            assert facts["output_dir"].endswith(f"group{g}") and facts["checksum"] == pytest.approx(ref["checksum"], abs=1e-6)
            logs, want = train_logs(facts), train_logs(ref)
            assert sorted(logs) == sorted(want) == list(range(1, STEPS + 1))
            for step in want:
                a, b = logs[step], want[step]
                for key in ("alpha", "peers", "cross_group_bytes", "group"):
                    assert a.get(key) == b.get(key), (g, r, step, key)
                for key in ("loss", "distill_loss", "agreement"):
                    assert (key in a) == (key in b), (g, r, step, key)
                    if key in b:
                        worst = max(worst, abs(a[key] - b[key]))
                        assert abs(a[key] - b[key]) <= 1e-6, (g, r, step, key, a[key], b[key])
            assert eval_logs(facts) == pytest.approx(eval_logs(ref), abs=1e-6)
        assert train_logs(runs[f"F{g}"][0])[STEPS]["distill_loss"] > 0
    print(f"\nTrainer, torchft (2 jobs x {S} ranks) vs one job: max |difference| {worst:.1e}")


# ---- gradient accumulation (issue 24, item 1) ----------------------------------------------------

ACCUM = {"G1": (4, 1), "G2": (2, 2), "G4": (1, 4)}
"""name: (per-device batch, gradient_accumulation_steps): 4 rows per optimizer step in each."""
ACCUM_ARGS = ["--deepspeed", "ds_configs/zero3.json", "--max_steps", "6", "--codistill_groups", "2",
              "--codistill_burn_in", "0", "--codistill_interval", "1", "--codistill_topk", "8",
              "--codistill_exchange_batch_size", "4", "--max_bytes", "100000", "--eval_steps", "6"]


def accum_example(out: Path, batch: int, accum: int) -> list[dict]:
    cmd = [*launcher(2, deepspeed=False), "examples/hf_trainer_clm.py", *ACCUM_ARGS, "--per_device_train_batch_size", str(batch),
           "--gradient_accumulation_steps", str(accum), "--output_dir", str(out / "out"),
           "--results_json", str(out / "res")]
    proc = run_captured(cmd, 420, cwd=REPO, env=child_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out / "res" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_accum")
    with ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(accum_example, tmp / name, *spec) for name, spec in ACCUM.items()}
        return {name: job.result() for name, job in jobs.items()}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", ["G2", "G4"])
def test_trainer_accumulation_trains_what_one_large_micro_batch_trains(accumulated, run):
    """The Trainer adds the distillation term once per optimizer step (first micro-batch),
    undoing its 1/accumulation where it divides (`CodistillTrainerMixin.compute_loss`). Two
    groups x 1 rank, ZeRO-3, alpha 1 from the first step, a fixed exchange batch of 4: 2 x 2 and
    4 x 1 give each group the losses, distillation losses, eval loss and final weights of one
    micro-batch of 4."""
    worst = 0.0
    for g in (0, 1):
        ref, got = accumulated["G1"][g], accumulated[run][g]
        ref_logs, got_logs = train_logs(ref), train_logs(got)
        assert sorted(got_logs) == sorted(ref_logs) == list(range(1, 7))
        for step, log in ref_logs.items():
            assert log["alpha"] == 1.0 and log["distill_loss"] > 0
            for key in ("loss", "distill_loss"):
                diff = abs(got_logs[step][key] - log[key])
                worst = max(worst, diff)
                assert diff <= (1e-5 if key == "loss" else 1e-6), (run, g, step, key, got_logs[step][key], log[key])
        assert abs(eval_logs(got)[6] - eval_logs(ref)[6]) <= 1e-5, (run, g)
        assert abs(got["checksum"] - ref["checksum"]) <= 1e-4 * max(1.0, abs(ref["checksum"])), (run, g)
    print(f"\n{run} vs G1: max |difference| of loss and distill_loss over 6 steps x 2 groups: {worst:.2e}")

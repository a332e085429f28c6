"""Acceptance: a stock Trainer script, plus the README's codistillation lines, under the real launchers on CPU.

The test writes its own run_clm-style script (tests/hf_stock.py), a byte-level tokenizer, text
files and a small saved model, applies the README's ```diff (5 lines) and runs it through
`tests/workers/hf_probe.py`, which records weights, partitions and logs from a TrainerCallback
without touching the script. Four launches in two phases, side by side:
  A  deepspeed --num_gpus 4, ZeRO-3, `from_config` of a llama with --config_overrides,
     2 groups x 2 ranks, 8 steps, alpha 1 after a 2-step burn-in, checkpoints at steps 4 and 8,
     exchanges consumed one step late (staleness 1, asynchronous)
  C  the same under ZeRO-2; rank 3's exchange predictions at step index 3 are NaN (group 1's
     other rank sends finite ones)
then
  B  as A, but `from_pretrained` of a small saved model, resumed from A's checkpoint-4
  D  2 groups x 1 rank, each rank its own process (no launcher that would kill the survivors),
     ZeRO-2: group 1's training loss is NaN at step index 2
FSDP2: Accelerate 1.15 never enables FSDP for CPU processes (checked below, in-process), so the
Trainer path runs FSDP2 only on GPUs.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ckpt_runs import launch_ranks, wait_all
from hf_stock import (
    CONFIG_OVERRIDES,
    STOCK_SCRIPT,
    byte_tokenizer,
    reference_model,
    text_files,
    write_scripts,
)

from codistill_ds.run.watchdog import EXIT_NONFINITE, EXIT_PEER_LOST
from launch import REPO, WORKERS, child_env, free_port, read_jsonl, run_captured

STEPS, SAVE_STEPS, BURN_IN, SEED, S = 8, 4, 2, 11, 2
NAN_LOGITS_STEP, NAN_LOSS_STEP = 3, 2
PROBE = str(WORKERS / "hf_probe.py")
IN_FLIGHT = ["--codistill_staleness", "1"]
"""A and B: each exchange is consumed one step later (asynchronous), so checkpoint-4 holds the
peers' targets posted at step index 3 for step index 4: the resume carries an exchange in flight."""
FROM_CONFIG = ["--model_type", "llama", "--config_overrides", CONFIG_OVERRIDES]
FSDP_ON_CPU = ("Accelerate 1.15 enables FSDP only for accelerator process types (AcceleratorState.__init__ "
               "checks MULTI_GPU, MULTI_XPU, ...; never MULTI_CPU), so the Trainer cannot run FSDP2 on CPU")


class Run:
    """One launch: its probe files and output folder."""

    def __init__(self, root: Path, nproc: int) -> None:
        self.root, self.nproc = root, nproc
        self.out, self.probe = root / "out", root / "probe"
        self.shm_left: list[str] = []

    def facts(self, rank: int) -> dict:
        return json.loads((self.probe / f"rank{rank}.json").read_text())

    def logs(self, rank: int) -> list[dict]:
        path = self.probe / f"logs_rank{rank}.jsonl"
        return read_jsonl(path)

    def train_logs(self, rank: int) -> dict[int, dict]:
        return {log["step"]: log for log in self.logs(rank) if "loss" in log}

    def init(self, rank: int) -> dict:
        return torch.load(self.probe / f"init_rank{rank}.pt")

    def final(self, group: int) -> dict:
        return torch.load(self.probe / f"final_group{group}.pt")


def stock_args(files: dict, run: Run, ds_config: str) -> list[str]:
    return ["--tokenizer_name", str(files["tok"]), "--train_file", str(files["train"]),
            "--validation_file", str(files["val"]), "--block_size", "32", "--output_dir", str(run.out),
            "--deepspeed", str(REPO / "ds_configs" / ds_config), "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "4", "--max_steps", str(STEPS), "--learning_rate", "5e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none", "--seed", str(SEED),
            "--disable_tqdm", "true", "--codistill_groups", "2",
            "--codistill_alpha", "1", "--codistill_burn_in", str(BURN_IN), "--codistill_topk", "8"]


def probe_env(run: Run, fault: str = "") -> dict:
    return {"PROBE_OUT": str(run.probe), "PROBE_FAULT": fault, "HF_DATASETS_CACHE": str(run.root / "cache")}


def deepspeed_launch(files: dict, run: Run, ds_config: str, *extra: str, fault: str = "") -> Run:
    """`deepspeed --num_gpus 4 hf_probe.py run_clm_codistill.py ...` from the test's folder."""
    run.root.mkdir(parents=True)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(run.nproc), "--master_port",
           str(port), PROBE, str(files["script"]), *stock_args(files, run, ds_config), *extra]
    proc = run_captured(cmd, 600, cwd=run.root, env=child_env(**probe_env(run, fault)))  # a timeout stops every rank
    (run.root / "launcher.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run.shm_left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    return run


def diverging_launch(files: dict, run: Run) -> tuple[Run, list]:
    """D: 2 ranks started one by one, group 1's loss NaN at step index NAN_LOSS_STEP."""
    run.root.mkdir(parents=True)
    argv = [PROBE, str(files["script"]), *stock_args(files, run, "zero2.json"), *FROM_CONFIG,
            "--codistill_peer_timeout_s", "60"]
    procs = launch_ranks(2, argv, run.root / "logs", **probe_env(run, f"nanloss:1:{NAN_LOSS_STEP}"))
    return run, wait_all(procs, timeout=400)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("stock")
    stock, script, count = write_scripts(tmp)
    byte_tokenizer(tmp / "tok")
    train, val = text_files(tmp)
    pretrained = tmp / "pretrained"
    reference_model(1234).save_pretrained(pretrained)  # a small "hub" model, loaded by B
    return {"tmp": tmp, "stock": stock, "script": script, "count": count, "tok": tmp / "tok", "train": train,
            "val": val, "pretrained": pretrained}


@pytest.fixture(scope="module")
def runs(files) -> dict:
    tmp = files["tmp"]
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(deepspeed_launch, files, Run(tmp / "A", 4), "zero3.json", *FROM_CONFIG, *IN_FLIGHT,
                        "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS))
        c = pool.submit(deepspeed_launch, files, Run(tmp / "C", 4), "zero2.json", *FROM_CONFIG,
                        fault=f"nanrank:3:{NAN_LOGITS_STEP}")
        out = {"A": a.result(), "C": c.result()}
        b = pool.submit(deepspeed_launch, files, Run(tmp / "B", 4), "zero3.json", *IN_FLIGHT, "--model_name_or_path",
                        str(files["pretrained"]), "--resume_from_checkpoint", str(out["A"].out / f"checkpoint-{SAVE_STEPS}"))
        d = pool.submit(diverging_launch, files, Run(tmp / "D", 2))
        out["B"], (out["D"], out["D_exits"]) = b.result(), d.result()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_readme_lines_fit_in_five(files):
    """The README's diff applies to the stock script (each hunk exactly once) with <= 5 '+' lines."""
    assert "codistill" not in STOCK_SCRIPT.lower()
    assert files["count"] <= 5, files["count"]
    print(f"\nlines added or changed in the stock script: {files['count']}")


@pytest.mark.timeout(1200)
def test_every_group_starts_initialized_from_its_own_seed(runs, files):
    """Right after construction (when the Trainer is built), every rank's gathered weights equal an
    unsharded `from_config` under seed + g (ZeRO-3 and ZeRO-2), or the saved model (`from_pretrained`)."""
    from transformers import AutoModelForCausalLM

    for name in ("A", "C"):
        for r in range(4):
            assert max_diff(runs[name].init(r), reference_model(SEED + r // S).state_dict()) == 0.0, (name, r)
    pretrained = AutoModelForCausalLM.from_pretrained(files["pretrained"]).state_dict()
    for r in range(4):
        assert max_diff(runs["B"].init(r), pretrained) == 0.0, r
    assert max_diff(runs["A"].init(0), runs["A"].init(2)) > 0  # diverse init across groups


@pytest.mark.timeout(1200)
def test_zero3_partitions_every_parameter_in_half(runs):
    """Every parameter (not only the first) has a 1/S partition on every rank; ZeRO-2's optimizer
    state is split in S flat partitions."""
    for name in ("A", "B"):
        for r in range(4):
            facts = runs[name].facts(r)
            assert facts["dp_world_size"] == S
            assert len(facts["parts"]) == 21
            for key, (local, full) in facts["parts"].items():
                assert local == math.ceil(full / S), (name, r, key, local, full)
    for r in range(4):
        facts = runs["C"].facts(r)
        assert facts["dp_world_size"] == S and facts["partition_count"] == [S] * len(facts["flat_partitions"])
        assert 0 <= S * sum(facts["flat_partitions"]) - facts["numel"] < 2 * S * len(facts["flat_partitions"])


@pytest.mark.timeout(1200)
def test_each_group_saves_its_own_model_state_and_metrics(runs):
    """output_dir/group{g}: a model `from_pretrained` loads (equal to the trained weights gathered
    in-group), the tokenizer, trainer_state.json and the metrics, with train_samples = the group's
    shard; the groups' models differ; no NaN anywhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("A", "B", "C"):
        run, rows = runs[name], []
        for g in range(2):
            folder = run.out / f"group{g}"
            loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
            final = run.final(g)
            assert max_diff(loaded, final) == 0.0, (name, g)
            assert all(torch.isfinite(v).all() for v in final.values()), (name, g)
            assert len(AutoTokenizer.from_pretrained(folder)) == 256
            state = json.loads((folder / "trainer_state.json").read_text())
            assert state["global_step"] == STEPS
            results = json.loads((folder / "all_results.json").read_text())
            facts = run.facts(2 * g)
            assert facts["output_dir"] == str(folder) and facts["should_save"] and not run.facts(2 * g + 1)["should_save"]
            assert results["train_samples"] == facts["train_rows"] and math.isfinite(results["eval_loss"])
            rows.append(facts["train_rows"])
            for r in (2 * g, 2 * g + 1):
                assert all(math.isfinite(log["loss"]) for log in run.train_logs(r).values()), (name, r)
        assert abs(rows[0] - rows[1]) <= 1  # two halves of one dataset
        assert max_diff(run.final(0), run.final(1)) > 1e-3
        print(f"\n{name}: train_samples per group {rows}")


@pytest.mark.timeout(1200)
def test_distillation_after_burn_in(runs):
    for name in ("A", "B", "C"):
        for g in range(2):
            logs = runs[name].train_logs(2 * g)
            assert sorted(logs) == list(range(1 if name != "B" else SAVE_STEPS + 1, STEPS + 1)), (name, sorted(logs))
            for step, log in logs.items():
                assert log["group"] == g and log["alpha"] == (0.0 if step <= BURN_IN else 1.0), (name, step)
                if step > BURN_IN:
                    assert log["distill_loss"] > 0, (name, g, step)


@pytest.mark.timeout(1200)
def test_checkpoints_per_group_and_exact_resume(runs):
    """Each group checkpoints into its own folder (DeepSpeed's `latest` tag included); B, one
    --resume_from_checkpoint path for every rank, resumes each group from its own checkpoint-4 and
    ends with A's weights and A's losses, bit for bit. The checkpoint holds an exchange in flight
    (staleness 1: the targets posted at step index 3 for step index 4, issue 24 item 7), which
    the resumed run distills on at its first step exactly as A did."""
    a, b = runs["A"], runs["B"]
    for g in range(2):
        for step in (SAVE_STEPS, STEPS):
            ckpt = a.out / f"group{g}" / f"checkpoint-{step}"
            assert (ckpt / "latest").read_text() == f"global_step{step}"
            assert (ckpt / "trainer_state.json").exists() and (ckpt / "model.safetensors").exists()
            assert sorted(p.name for p in ckpt.glob("codistill_rank*.pt")) == [f"codistill_rank{2 * g}.pt",
                                                                              f"codistill_rank{2 * g + 1}.pt"]
            state = torch.load(ckpt / f"codistill_rank{2 * g}.pt", weights_only=True)
            assert sorted(state["pending"]) == [step], (g, step, sorted(state["pending"]))  # one in flight
        assert max_diff(a.final(g), b.final(g)) == 0.0, g
        ref, resumed = a.train_logs(2 * g), b.train_logs(2 * g)
        for step in range(SAVE_STEPS + 1, STEPS + 1):
            for key in ("loss", "distill_loss", "agreement", "cross_group_bytes"):
                assert resumed[step][key] == ref[step][key], (g, step, key)
    assert all(b.facts(r)["start_step"] == SAVE_STEPS for r in range(4))


@pytest.mark.timeout(1200)
def test_nan_peer_predictions_are_skipped_and_counted(runs):
    """C: rank 3's predictions at step index 3 are NaN (group 1's rank 2 sent finite ones); under
    the leaders route they reach group 0's rank 1 only, yet both ranks of group 0 drop group 1
    for that step only (the finiteness is agreed over the group, issue 24): rank 0, whose log
    this is, received finite predictions."""
    logs = runs["C"].train_logs(0)
    assert [logs[s]["skipped_peers"] for s in range(1, STEPS + 1)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert logs[NAN_LOGITS_STEP + 1]["peers"] == 0 and logs[NAN_LOGITS_STEP + 2]["peers"] == 1
    assert all(log["skipped_peers"] == 0 for log in runs["C"].train_logs(2).values())
    err = (runs["C"].root / "launcher.log").read_text()
    assert f"group 0 skipped the predictions of peer group(s) [1] for exchange {NAN_LOGITS_STEP}" in err


@pytest.mark.timeout(1200)
def test_diverged_group_stops_and_its_peers_are_told(runs):
    """D: group 1 stops right after the NaN step, before its next exchange (exit 4, one line);
    group 0 then exits 3 with one line naming group 1 and why."""
    run, exits = runs["D"], runs["D_exits"]
    codes = [code for code, _ in exits]
    assert codes == [EXIT_PEER_LOST, EXIT_NONFINITE], codes

    def error_lines(rank: int) -> list[str]:
        text = (run.root / "logs" / f"rank{rank}.err").read_text()
        return [ln[ln.index("codistill-ds: error:"):] for ln in text.splitlines() if "codistill-ds: error:" in ln]

    (line,) = error_lines(1)
    assert f"rank 1 (group 1): training loss is not finite at step {NAN_LOSS_STEP + 1}" in line, line
    assert "before sending predictions" in line and "no checkpoint yet" in line, line
    (line,) = error_lines(0)
    assert "rank 0 (group 0) stopping" in line, line
    assert f"rank 1 (group 1) reported: group 1 stopped: training loss is not finite at step {NAN_LOSS_STEP + 1}" in line
    assert max(run.train_logs(0)) == NAN_LOSS_STEP + 1 and not run.train_logs(1).get(NAN_LOSS_STEP + 1)
    assert all(math.isfinite(log["loss"]) for log in run.train_logs(0).values())


def test_no_shared_memory_left_behind(runs):
    """DeepSpeed's CPU accelerator maps a 69 MB /dev/shm buffer per rank under the deepspeed
    launcher and never unlinks it; `codistill_init` unlinks each rank's once all are mapped."""
    for name in ("A", "B", "C"):
        assert runs[name].shm_left == [], (name, runs[name].shm_left)


def test_accelerate_keeps_fsdp_off_for_cpu_processes():
    """The reason FSDP2 is skipped below: an FSDP2 plugin on a CPU process group stays MULTI_CPU."""
    code = ("from accelerate import Accelerator; from accelerate.utils import FullyShardedDataParallelPlugin\n"
            "a = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))\n"
            "print(a.state.distributed_type, a.is_fsdp2)")
    env = child_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["DistributedType.MULTI_CPU", "False"], proc.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason=FSDP_ON_CPU + "; this check needs 4 GPUs")
@pytest.mark.timeout(900)
def test_fsdp2_stock_script_on_gpus(files, tmp_path):
    """Untested here (no GPU): the same script under torchrun with FSDP2, 2 groups x 2 GPUs."""
    run = Run(tmp_path / "F", 4)
    run.root.mkdir()
    args = [a for a in stock_args(files, run, "zero3.json") if not a.endswith(".json") and a != "--deepspeed"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(free_port()),
           PROBE, str(files["script"]), *args, *FROM_CONFIG, "--fsdp", "full_shard", "--fsdp_config",
           json.dumps({"fsdp_version": 2})]
    proc = subprocess.run(cmd, cwd=run.root, env=child_env(**probe_env(run)), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    from transformers import AutoModelForCausalLM

    for g in range(2):
        assert max_diff(AutoModelForCausalLM.from_pretrained(run.out / f"group{g}").state_dict(), run.final(g)) == 0.0
    assert max_diff(run.final(0), run.final(1)) > 1e-3

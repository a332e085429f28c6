"""`make gpu-check`: the GPU paths the CPU suite cannot run, in a few minutes, one line per check.

For each backend (DeepSpeed ZeRO-3, FSDP2) a 2-group job trains tests/gpu/gpu_check.yaml in bf16
with an asynchronous exchange and a checkpoint halfway; a second job resumes from that
checkpoint. Printed figures: tokens/s per group, peak GPU memory per group, loss decreasing,
distillation active, cross-group bytes, and the largest loss difference between the resumed and
the uninterrupted run (exact resume: 0).

- 2+ GPUs: one job (`transport: world`), 2 groups x (GPUs // 2) ranks, NCCL inside groups and
  for the exchange (`exchange_backend: auto`).
- 1 GPU: two ranks cannot share one NCCL communicator (docs/design.md, "GPU notes"), so each group is
  its own 1-rank job on the same GPU, meeting through a torchft Lighthouse, with the exchange
  over gloo: `codistill-ds lighthouse --port P`, then per group `torchrun --nproc_per_node 1 -m
  codistill_ds.cli train ... --set codistill.transport=torchft --set codistill.group_id=G ...`.
- tensor parallelism (check "tp", FSDP2 + DTensor TP, fp32 compute and wire, staleness 0): K=2
  groups x T=2 on 4 GPUs (`parallel.tp=2`) against K=2 x T=1 on 2 GPUs, the same seed and tokens:
  per-step losses and distillation losses within TP_TOLERANCE, the same cross-group bytes (each
  TP rank sends half of its rows), peak memory per group. Needs 4 GPUs: with fewer it prints one
  line saying it was skipped and why (the one-GPU flow above runs as before).
- `--cpu`: the same flows on CPU with gloo (2 groups x 1 rank, 6 steps; TP on 4 ranks): checks this script.
- `--cpu-two-jobs`: the 1-GPU flow (two 1-rank jobs and a Lighthouse) on CPU, 6 steps.
- `--dry-run`: print the commands only.

    python tests/gpu/gpu_check.py --gpus 1 --out runs/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().with_name("gpu_check.yaml")
BACKENDS = {"zero3": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
            "fsdp2": ["backend.name=fsdp"]}
CPU_SETS = ["train.steps=6", "train.save_interval=3", "train.eval_interval=6", "data.seq_len=64",
            "model.max_seq_len=64", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
            "model.intermediate_size=128", "data.micro_batch_size=2", "data.max_bytes=300000"]
TP_SETS = ["backend.name=fsdp", "backend.precision=fp32", "codistill.dtype=fp32", "codistill.staleness=0",
           "codistill.async_exchange=false", "codistill.route=rails", "train.save_interval=0", "train.eval_interval=0"]
"""The T=2 vs T=1 comparison: fp32 everywhere and a synchronous exchange, so the two layouts differ
only by the order of TP's partial sums."""
TP_GPUS = 4
TP_TOLERANCE = {"cpu": 1e-5, "gpu": 1e-3}
"""Largest |loss difference| between T=2 and T=1 (fp32): on CPU/gloo the same code measured 1e-6;
on GPUs cuBLAS picks its kernels per shape, so half-width matmuls sum in another order."""
RESUME_TOLERANCE = 1e-3
"""Largest |loss difference| accepted after resuming on a GPU (0 on CPU): cuBLAS/flash-attention
backward kernels may reduce in a different order from run to run."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(nproc: int, run_dir: Path, sets: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "codistill_ds.cli", "train", "--config", str(CONFIG), "--run-dir", str(run_dir)]
    return argv + [a for s in sets for a in ("--set", s)]


def jobs(mode: str, gpus: int, backend: str, run: Path, resume_step: int | None, sets: list[str]) -> list[tuple[list[str], Path]]:
    """(command, run dir) of every process of one training run; one entry per group in 1-GPU mode."""
    base = [*BACKENDS[backend], *sets]
    if not mode.endswith("two_jobs"):
        extra = [] if resume_step is None else [f"train.resume={run.parent / 'straight' / 'checkpoints' / f'step_{resume_step}'}"]
        nproc = 2 if mode == "cpu" else gpus - gpus % 2
        return [(train_cmd(nproc, run, base + extra), run)]
    out = []
    for g in range(2):
        run_dir = run / f"group{g}"
        extra = [f"codistill.group_id={g}", "codistill.transport=torchft", "codistill.exchange_backend=gloo",
                 "codistill.lighthouse=http://127.0.0.1:{port}"]
        if resume_step is not None:
            extra.append(f"train.resume={run.parent / 'straight' / f'group{g}' / 'checkpoints' / f'step_{resume_step}'}")
        out.append((train_cmd(1, run_dir, base + extra), run_dir))
    return out


def launch(commands: list[tuple[list[str], Path]], mode: str, timeout: float, dry: bool) -> None:
    """Start every process of one run (and the Lighthouse in 1-GPU mode); wait for all of them.

    The Lighthouse takes a port of its own choosing (--port 0) and prints its URL, which goes into
    the group commands: a port picked in advance could be taken by then (a job's master port)."""
    two = mode.endswith("two_jobs")
    lighthouse = [sys.executable, "-m", "codistill_ds.cli", "lighthouse", "--port", "0", "--bind", "127.0.0.1"]
    if dry:
        for cmd in ([lighthouse] if two else []) + [c for c, _ in commands]:
            print("  $ " + " ".join(cmd))
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if mode.startswith("cpu"):
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    helper = None
    if two:  # its per-request log goes to a file beside the groups' logs, its URL line to us
        commands[0][1].parent.mkdir(parents=True, exist_ok=True)
        with open(commands[0][1].parent / "lighthouse.log", "w") as log:
            helper = subprocess.Popen(lighthouse, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    procs = []
    try:
        if helper is not None:
            line = helper.stdout.readline()  # "codistill-ds lighthouse: listening on http://127.0.0.1:P ..."
            url = line.split("listening on ")[1].split()[0]
            commands = [([a.replace("http://127.0.0.1:{port}", url) for a in cmd], d) for cmd, d in commands]
        for cmd, run_dir in commands:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "launch.log", "w") as log:  # the child keeps its own descriptor
                procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), run_dir))
        deadline = time.monotonic() + timeout
        for proc, run_dir in procs:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                tail = (run_dir / "launch.log").read_text()[-3000:]
                raise RuntimeError(f"{' '.join(proc.args[-8:])} exited {rc}; end of {run_dir / 'launch.log'}:\n{tail}")
    finally:
        for proc, _ in procs:  # a failed group must not leave its peer waiting
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if helper is not None:
            helper.terminate()


def records(run_dirs: list[Path]) -> dict[int, dict[int, dict]]:
    """group -> step -> metrics record, over every run dir of one run."""
    out: dict[int, dict[int, dict]] = {}
    for d in run_dirs:
        for line in (d / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["group"], {})[r["step"]] = r
    return out


def peaks(run_dirs: list[Path]) -> dict[int, int]:
    out = {}
    for d in run_dirs:
        for g in json.loads((d / "summary.json").read_text())["per_group"]:
            out[g["group"]] = max(out.get(g["group"], 0), g["peak_memory_bytes"])
    return out


def figures(straight: dict, resumed: dict, resume_step: int, peak: dict) -> list[tuple[str, str, bool]]:
    """(check, figure, passed) from the metrics of the uninterrupted and the resumed run."""
    rows = []
    for g, steps in sorted(straight.items()):
        ordered = [steps[s] for s in sorted(steps)]
        per_step = ordered[1]["tokens"] - ordered[0]["tokens"]
        tps = statistics.median(per_step / (r["step_ms"] / 1e3) for r in ordered[2:])
        first, last = (statistics.mean(r["loss"] for r in part) for part in (ordered[:3], ordered[-3:]))
        distill = [r["distill_loss"] for r in ordered if r["alpha"] > 0 and r["distill_loss"] is not None]
        rows += [(f"group {g} tokens/s", f"{tps:,.0f}", tps > 0),
                 (f"group {g} peak memory", f"{peak[g] / 2**30:.2f} GiB", peak[g] > 0),
                 (f"group {g} loss decreasing", f"{first:.3f} -> {last:.3f}", last < first),
                 (f"group {g} distillation active", f"last distill_loss {distill[-1]:.4g}" if distill else "none",
                  bool(distill) and distill[-1] > 0),
                 (f"group {g} cross-group bytes", f"{ordered[-1]['cross_group_bytes']:,}", ordered[-1]["cross_group_bytes"] > 0)]
    diffs = [abs(resumed[g][s]["loss"] - straight[g][s]["loss"]) for g in straight for s in straight[g] if s > resume_step]
    worst = max(diffs) if diffs else float("nan")
    rows.append((f"exact resume from step {resume_step}", f"max |loss difference| {worst:.3g} over {len(diffs)} records",
                 bool(diffs) and worst <= RESUME_TOLERANCE))
    return rows


def check_backend(backend: str, mode: str, gpus: int, out: Path, dry: bool, sets: list[str]) -> bool:
    half = 3 if mode.startswith("cpu") else 15
    ok = True
    straight, resumed = out / backend / "straight", out / backend / "resumed"
    for run, step in ((straight, None), (resumed, half)):
        cmds = jobs(mode, gpus, backend, run, step, sets)
        if not dry and run.exists():
            shutil.rmtree(run)
        start = time.monotonic()
        launch(cmds, mode, timeout=420 if mode.startswith("cpu") else 240, dry=dry)
        if not dry:
            print(f"gpu-check: {backend} {run.name} run took {time.monotonic() - start:.0f}s", flush=True)
    if dry:
        return True
    dirs = [d for _, d in jobs(mode, gpus, backend, straight, None, sets)]
    rdirs = [d for _, d in jobs(mode, gpus, backend, resumed, half, sets)]
    for name, figure, passed in figures(records(dirs), records(rdirs), half, peaks(dirs)):
        print(f"gpu-check: {backend:5} {name:<34} {figure:<44} {'PASS' if passed else 'FAIL'}", flush=True)
        ok &= passed
    return ok


def tp_jobs(mode: str, run: Path, sets: list[str]) -> list[tuple[list[str], Path]]:
    """(command, run dir) of the T=1 run (2 groups x 1 rank) and the T=2 run (2 groups x 2 TP ranks)."""
    base = [*sets, *TP_SETS, *([] if mode.startswith("cpu") else ["train.steps=20"])]
    return [(train_cmd(2 * tp, run / f"tp{tp}", [*base, f"parallel.tp={tp}"]), run / f"tp{tp}") for tp in (1, 2)]


def group_bytes(run_dir: Path) -> dict[int, int]:
    """Cross-group bytes each group's ranks sent in all (summary.json)."""
    return {g["group"]: g["cross_group_bytes"] for g in json.loads((run_dir / "summary.json").read_text())["per_group"]}


def tp_figures(t1: dict, t2: dict, bytes1: dict, bytes2: dict, peak1: dict, peak2: dict,
               tolerance: float) -> list[tuple[str, str, bool]]:
    """(check, figure, passed) of the T=2 run against the T=1 run, from their records and summaries."""
    rows = []
    for key, name in (("loss", "loss"), ("distill_loss", "distill_loss")):
        diffs = [abs(t2[g][s][key] - t1[g][s][key]) for g in t1 for s in t1[g]
                 if s in t2.get(g, {}) and t1[g][s].get(key) is not None and t2[g][s].get(key) is not None]
        worst = max(diffs) if diffs else float("nan")
        rows.append((f"T=2 vs T=1 {name}", f"max |difference| {worst:.3g} over {len(diffs)} records",
                     bool(diffs) and worst <= tolerance))
    last = [steps[max(steps)] for steps in t2.values()]
    rows.append(("T=2 distillation active", ", ".join(f"{r['distill_loss']:.4g}" for r in last if r.get("distill_loss") is not None),
                 bool(last) and all(r["alpha"] > 0 and (r.get("distill_loss") or 0) > 0 for r in last)))
    total1, total2 = sum(bytes1.values()), sum(bytes2.values())
    rows.append(("T=2 vs T=1 cross-group bytes", f"{total2:,} vs {total1:,}", total1 > 0 and total1 == total2))
    for g in sorted(peak2):
        rows.append((f"group {g} peak memory T=2 / T=1", f"{peak2[g] / 2**30:.2f} / {peak1.get(g, 0) / 2**30:.2f} GiB",
                     peak2[g] > 0))
    return rows


def check_tp(mode: str, gpus: int, out: Path, dry: bool, sets: list[str]) -> bool:
    """K=2 x T=2 against K=2 x T=1; one line saying why when this machine cannot run it."""
    if mode.endswith("two_jobs") or (not mode.startswith("cpu") and gpus < TP_GPUS):
        have = "one GPU (emulated on CPU)" if mode == "cpu_two_jobs" else f"{gpus} GPU(s)"
        print(f"gpu-check: tp    skipped: K=2 groups x T=2 needs {TP_GPUS} GPUs, this machine has {have}", flush=True)
        return True
    cmds = tp_jobs(mode, out / "tp", sets)
    for cmd, run_dir in cmds:
        if not dry and run_dir.exists():
            shutil.rmtree(run_dir)
        start = time.monotonic()
        launch([(cmd, run_dir)], mode, timeout=420 if mode.startswith("cpu") else 240, dry=dry)
        if not dry:
            print(f"gpu-check: tp    {run_dir.name} run took {time.monotonic() - start:.0f}s", flush=True)
    if dry:
        return True
    (_, d1), (_, d2) = cmds
    tolerance = TP_TOLERANCE["cpu" if mode.startswith("cpu") else "gpu"]
    ok = True
    for name, figure, passed in tp_figures(records([d1]), records([d2]), group_bytes(d1), group_bytes(d2),
                                           peaks([d1]), peaks([d2]), tolerance):
        print(f"gpu-check: tp    {name:<34} {figure:<44} {'PASS' if passed else 'FAIL'}", flush=True)
        ok &= passed
    return ok


def has_torchft_transport() -> bool:
    import dataclasses

    from codistill_ds.config import CodistillConfig

    return "transport" in {f.name for f in dataclasses.fields(CodistillConfig)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all CUDA sees)")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    p.add_argument("--cpu", action="store_true", help="run the same flow on CPU (checks this script)")
    p.add_argument("--cpu-two-jobs", action="store_true",
                   help="run the one-GPU flow (two 1-rank jobs and a Lighthouse) on CPU")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--backends", default="zero3,fsdp2,tp",
                   help="checks: zero3, fsdp2 (2 groups, bf16, resume), tp (K=2 x T=2 against T=1, 4 GPUs)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    gpus = args.gpus
    if not (args.cpu or args.cpu_two_jobs) and not gpus:
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            print("gpu-check: no CUDA device visible to torch; nothing run", file=sys.stderr)
            return 2
    mode = ("cpu_two_jobs" if args.cpu_two_jobs else "cpu" if args.cpu
            else "two_jobs" if gpus == 1 else "one_job")
    if mode == "two_jobs" and not has_torchft_transport() and not args.dry_run:
        print("gpu-check: one GPU needs each group as its own job (codistill.transport=torchft), which this "
              "checkout does not have yet; rerun on 2+ GPUs", file=sys.stderr)
        return 4
    sets = CPU_SETS if mode.startswith("cpu") else []
    print(f"gpu-check: mode {mode}, {gpus or 'no'} GPU(s), backends {args.backends}, output {args.out}", flush=True)
    start, ok = time.monotonic(), True
    for backend in args.backends.split(","):
        try:
            if backend == "tp":
                ok &= check_tp(mode, gpus, Path(args.out), args.dry_run, sets)
                continue
            ok &= check_backend(backend, mode, gpus, Path(args.out), args.dry_run, sets)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as err:
            print(f"gpu-check: {backend:5} FAIL: {err}", flush=True)
            ok = False
    if args.dry_run:
        print("gpu-check: dry run, nothing executed")
        return 0
    print(f"gpu-check: {'all checks passed' if ok else 'FAILED'} in {time.monotonic() - start:.0f}s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

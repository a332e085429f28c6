"""Shared pieces of the communication benchmark: settings, arm overrides, local launches, run
records. Each part (bytes.py, overhead.py, twonode.py) builds its arms from `base_sets` and
reads its runs with `load_run`; launching is `codistill_ds.distributed.launching`, shared with the tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from codistill_ds.distributed.launching import child_env, run_logged, torchrun_argv

ALONE_INTERVAL = 10**6
"""`codistill.interval` of the "alone" arm: one exchange at step 0, none after."""


@dataclass(frozen=True)
class Mode:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    micro_batch: int
    max_bytes: int
    # (a) bytes
    bytes_nproc: int
    bytes_steps: int
    bytes_wires: tuple[tuple[int, str], ...]
    """(codistill.topk, codistill.dtype) of each codistill arm, per route."""
    bytes_routes: tuple[str, ...]
    # (b) overhead
    overhead_steps: int
    overhead_repeats: int
    overhead_skip: int
    """Leading steps left out of the step-time statistics (warm-up, the alone arm's exchange)."""
    # (c) two nodes
    rates: tuple[str, ...]
    sync_steps: int
    codistill_steps: int
    eval_interval: int
    val_batches: int
    """Validation micro-batches per rank of the 4-rank sync arm (codistill ranks score 2x)."""
    alone_steps: int
    """Steps of the 2-node "alone" arm at the slowest rate (0: no such arm)."""
    exchange_batch: int = 4
    staleness: int = 2
    ranks_per_node: int = 2
    """Ranks in each namespace; codistill puts one group per node (S = ranks_per_node)."""
    timeout_s: float = 900.0
    extra_sets: tuple[str, ...] = ()
    """`--set key=value` overrides for every arm (e.g. a compact wire format), applied over the
    shared settings and under each arm's own."""


WIRES = ((8, "bf16"), (32, "bf16"), (0, "bf16"), (32, "fp8"), (1, "fp8"))
"""(topk, value dtype) of the bytes part's codistill arms; ids are the byte vocabulary's uint16."""

MODEL = {"hidden_size": 96, "num_layers": 4, "num_heads": 4, "intermediate_size": 384,
         "seq_len": 64, "micro_batch": 4, "max_bytes": 2_000_000}
"""A 0.64M-parameter byte-level Llama: 2.6 MB of fp32 gradients per step (about 5.8 MB per
direction of the node link per ZeRO-2 step), a few hundred ms of compute per step here."""


MODES: dict[str, Mode] = {
    "smoke": Mode("smoke", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  seq_len=32, micro_batch=2, max_bytes=200_000,
                  bytes_nproc=2, bytes_steps=4, bytes_wires=((8, "bf16"), (0, "bf16"), (1, "fp8")), bytes_routes=("leaders",),
                  overhead_steps=12, overhead_repeats=1, overhead_skip=2,
                  rates=("100mbit",), sync_steps=4, codistill_steps=4, eval_interval=2,
                  val_batches=1, alone_steps=0, ranks_per_node=1, exchange_batch=2,
                  timeout_s=300),
    "quick": Mode("quick", **MODEL,
                  bytes_nproc=4, bytes_steps=4, bytes_wires=WIRES,
                  bytes_routes=("leaders", "rails"),
                  overhead_steps=20, overhead_repeats=4, overhead_skip=4,
                  rates=("100mbit", "10mbit"), sync_steps=20, codistill_steps=40,
                  eval_interval=4, val_batches=2, alone_steps=0),
    "full": Mode("full", **MODEL,
                 bytes_nproc=4, bytes_steps=8, bytes_wires=WIRES,
                 bytes_routes=("leaders", "rails"),
                 overhead_steps=30, overhead_repeats=8, overhead_skip=4,
                 rates=("100mbit", "10mbit"), sync_steps=40, codistill_steps=80,
                 eval_interval=5, val_batches=2, alone_steps=30, timeout_s=1200),
}


def sets_of(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]  # JSON is YAML


def base_sets(mode: Mode, **extra) -> dict:
    """Everything an arm shares: model, data, optimizer, ZeRO-2 in fp32 on CPU; then the
    mode's `extra_sets`, then the arm's own `extra`."""
    shared = {
        "seed": 1234,
        "model.arch": "llama", "model.hidden_size": mode.hidden_size,
        "model.num_layers": mode.num_layers, "model.num_heads": mode.num_heads,
        "model.intermediate_size": mode.intermediate_size, "model.max_seq_len": mode.seq_len,
        "data.seq_len": mode.seq_len, "data.max_bytes": mode.max_bytes,
        "data.micro_batch_size": mode.micro_batch, "data.val_batches": 1,
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.schedule": "constant",
        "optim.warmup_steps": 5, "optim.weight_decay": 0.05,
        "train.eval_interval": 0, "train.log_interval": 1,
        "backend.name": "deepspeed", "backend.ds_config": "ds_configs/zero2.json",
        "backend.precision": "fp32",
        "codistill.groups": 2, "codistill.topk": 32, "codistill.dtype": "bf16",
        "codistill.interval": 1, "codistill.staleness": 0, "codistill.alpha": 1.0,
    }
    for item in mode.extra_sets:
        key, _, value = item.partition("=")
        shared[key.strip()] = yaml.safe_load(value)
    return {**shared, **extra}


# ----------------------------------------------------------------------------- launching


EXT_DIR = (Path.home() / ".cache" / "codistill-comm-bench" / "torch_extensions"
           / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])
"""A private JIT-extension cache for DeepSpeed's CPU comm op. The shared default
(~/.cache/torch_extensions) is rebuilt whenever a job from another virtualenv built it last,
under a file lock every DeepSpeed process on the machine waits for; a run that is stopped
mid-build leaves that lock behind and stalls everyone. Here only this benchmark waits."""


STALE_LOCK_S = 300.0


def clear_stale_locks() -> list[str]:
    """Remove build locks in EXT_DIR older than STALE_LOCK_S (left by a stopped launch)."""
    removed = []
    for lock in EXT_DIR.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:
            pass
    return removed


def bench_env() -> dict[str, str]:
    """The launch environment: CPU DeepSpeed unless DS_ACCELERATOR is set, the private
    extension cache unless TORCH_EXTENSIONS_DIR is set."""
    return child_env(force_cpu=False,
                     TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(EXT_DIR)))


def fresh_dirs(arms: list[dict]) -> None:
    for arm in arms:
        d = Path(arm["run_dir"])
        if d.exists():
            shutil.rmtree(d)  # metrics.jsonl is appended to: a stale one would mix two runs
        d.mkdir(parents=True)


def worker_argv(nproc: int, job: Path, rendezvous: list[str] | None = None) -> list[str]:
    """torchrun running the benchmark's rank program (benchmarks/comm/worker.py) on `job`."""
    return torchrun_argv(nproc, ["-m", "benchmarks.comm.worker", str(job)], rendezvous)


def launch_local(name: str, arms: list[dict], nproc: int, out: Path, timeout_s: float) -> float:
    """All arms in one `torchrun --nproc_per_node nproc` job on loopback; returns wall seconds."""
    fresh_dirs(arms)
    clear_stale_locks()
    job = out / f"job_{name}.json"
    job.write_text(json.dumps({"arms": arms}, indent=1))
    return run_logged(worker_argv(nproc, job), out / f"launch_{name}.log", timeout_s, name,
                      env=bench_env())


# ----------------------------------------------------------------------------- run records


BYTE_VOCAB = 256
"""The byte tokenizer's vocabulary: the benchmark trains byte-level models."""


def load_run(run_dir: str, world: int | None = None) -> dict:
    d = Path(run_dir)
    summary = json.loads((d / "summary.json").read_text())
    world = world or summary["world_size"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "summary": summary, "records": records,
        "config": yaml.safe_load((d / "config.yaml").read_text()),
        "comm": [json.loads((d / f"comm_rank{r}.json").read_text()) for r in range(world)],
    }


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def wire_bytes(comm: dict, phases: tuple[str, ...], scope: str | None = None, op: str | None = None) -> float:
    total = 0.0
    for key, v in comm["counters"].items():
        phase, sc, o = key.split("|")
        if phase in phases and (scope is None or sc == scope) and (op is None or o == op):
            total += v["wire_bytes"]
    return total


def fmt(x, spec="{:,.0f}") -> str:
    return "-" if x is None else spec.format(x)

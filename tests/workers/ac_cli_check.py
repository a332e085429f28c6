"""Rank program: the CLI job with `model.activation_checkpointing` none / full / selective under
DeepSpeed ZeRO-3 and FSDP2, the same seed and data: per-step losses, and peak resident memory.

4 ranks, K = 2 groups of S = 2, codistilling (alpha 1, an exchange every step), dropout 0.1. The model (4
layers, hidden 256, vocabulary 256, 4.1M parameters) sees 4 x 128 tokens per rank and step, so
activations dominate a step. Each run is `run.job.build_job` + `loop.run`, the CLI's own path;
a hook records every step's loss and distillation loss (group means) and, from the start of
step 1 (step 0 allocates the optimizer states) to the end, the rise of VmHWM over VmRSS (reset
through /proc/self/clear_refs; the launcher sets MALLOC_MMAP_THRESHOLD_). Args: OUT [BACKEND:MODE,...]. Writes
OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from resident import reset_peak, status

from codistill_ds.backends.activation_checkpointing import checkpointed_layers
from codistill_ds.config import load_config
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.run.job import build_job
from codistill_ds.run.loop import LoopHooks

REPO = Path(__file__).resolve().parents[2]
MODEL = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
         "model.intermediate_size=1024", "model.max_seq_len=128"]
RUN = ["data.seq_len=128", "data.micro_batch_size=4", "data.exchange_batch_size=4", "train.steps=3",
       "train.eval_interval=0", "codistill.alpha=1.0", "codistill.interval=1", "codistill.dtype=fp32",
       "optim.grad_clip=0.5", "optim.dropout=0.1",
       # Patience for a starved peer: the test runs this launch niced (tests/background.py), and a
       # dropped round would change the losses; no timeout changes a number otherwise.
       "codistill.exchange_timeout_s=1800", "backend.peer_timeout_s=3600", "backend.timeout_s=3600"]
BACKENDS = {"zero3": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
            "fsdp": ["backend.name=fsdp"]}
MODES = ("none", "full", "selective")


class Recorder(LoopHooks):
    def __init__(self) -> None:
        self.loss, self.distill, self.base, self.peak = [], [], 0, 0

    def on_step_start(self, loop, step: int) -> None:
        if step == 1:
            self.base = reset_peak()

    def on_record(self, loop, record: dict) -> None:
        self.loss.append(record["loss"])
        self.distill.append(record.get("distill_loss"))

    def on_run_end(self, loop, state) -> None:
        self.peak = status("VmHWM") - self.base


def run(backend: str, mode: str, out: Path) -> dict:
    cfg = load_config(str(REPO / "tests" / "tiny_test.yaml"), [
        *MODEL, *RUN, *BACKENDS[backend], f"model.activation_checkpointing={mode}",
        f"run_dir={out / f'{backend}_{mode}'}"])
    rec = Recorder()
    job = build_job(cfg, hooks=[rec])
    wrapped = checkpointed_layers(job.backend.module)
    job.loop.run(0, None)
    if job.transport is not None:
        job.transport.close()
    dist.barrier()
    return {"backend": backend, "ac": mode, "group": job.topology.group_id, "loss": rec.loss,
            "distill_loss": rec.distill, "peak_above_baseline": rec.peak, "wrapped": wrapped, "params": job.n_params}


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else [f"{b}:{m}" for b in BACKENDS for m in MODES]
    runs = [run(*case.split(":"), out) for case in only]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"rank": dist.get_rank(), "runs": runs}))
    dist.barrier()
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()

"""Rank program: `codistill_ds.run.job.run` with recorders and injected faults. Args: OUT CONFIG
[overrides...], or several runs one after another on the same ranks (tests/workers/runs.py:
`@NAME [overrides...]`..., each writing under OUT/NAME). Writes OUT/rank{r}.json: the step it started from, digests of the predictions
it sent and received per step, a digest of its group's full weights at the end (weight exchange:
of each teacher's shards and of the shard it sent last), and (leaders)
OUT/logits_group{g}.pt: eval-mode logits of the trained replica on a fixed batch.

FAULT (env, comma-separated, first attempt only, i.e. TORCHELASTIC_RESTART_COUNT == 0):
  kill:R:S       rank R SIGKILLs itself at the start of step index S
  save:R:S       rank R SIGKILLs itself inside the save of checkpoint step_S (engine written)
  nanlogits:G:S  group G's exchange predictions at step index S are NaN
  nanloss:G:S    group G's training logits at step index S are NaN (its loss diverges)

PACE_FILE (env): a file holding seconds to sleep before each step, re-read every step, so a test
can slow the groups down while it injects failures and let them finish fast afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from codistill_ds.config import load_config
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.exchange.wire import pack
from codistill_ds.run import job as train
from codistill_ds.run.loop import CodistillLoop
from runs import split_runs

STEP = [0]
RECORD: dict = {"sent": {}, "recv": {}, "start_step": None}
JOBS: list = []
PLAN: list[tuple[str, int, int]] = []
"""The faults of the run in progress: FAULT is read as each run starts (`run_one`), so one
process can run a clean run and then a faulty one (ckpt_run_then_killed.py)."""
RESETS: list = []
"""Called with the run's out dir before each run: a recorder's state starts empty (probe_run)."""


def faults() -> list[tuple[str, int, int]]:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return []
    out = []
    for item in filter(None, os.environ.get("FAULT", "").split(",")):
        kind, who, step = item.split(":")
        out.append((kind, int(who), int(step)))
    return out


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def install(rank: int) -> None:
    plan = PLAN
    orig_step = CodistillLoop.train_step

    def train_step(self, step):
        STEP[0] = step
        if ("kill", rank, step) in plan:
            os.kill(os.getpid(), signal.SIGKILL)
        pace()
        return orig_step(self, step)

    CodistillLoop.train_step = train_step

    orig_build, orig_restore = train.build_job, train.restore

    def build_job(cfg, hooks=()):
        job = orig_build(cfg, hooks)
        JOBS.append(job)
        wrap_backend(job, plan)
        if job.loop.engine is not None:
            job.loop.engine.observers.append(observe)
        return job

    def restore(job, resume):
        root = os.path.join(job.cfg.run_dir, "checkpoints")
        RECORD["checkpoints_at_start"] = sorted(os.listdir(root)) if os.path.isdir(root) else []
        step, rng = orig_restore(job, resume)
        RECORD["start_step"] = step
        RECORD["restored_weights"] = weights_digest(job)  # what the resumed run starts from
        return step, rng

    train.build_job, train.restore = build_job, restore


def pace() -> None:
    path = os.environ.get("PACE_FILE")
    if path:
        try:
            time.sleep(float(Path(path).read_text() or 0))
        except (OSError, ValueError):
            pass


def observe(event: str, step: int, payload) -> None:
    """The engine's record of what this rank sent and received, per posting step."""
    if event == "sent":
        RECORD["sent"][step] = digest(pack(payload))
    else:
        RECORD["recv"][step] = [digest(pack(p)) for p in payload.peers]


def wrap_backend(job, plan) -> None:
    backend, g, rank = job.backend, job.topology.group_id, job.topology.rank
    forward, save = backend.forward, backend.save

    def fwd(ids):
        logits = forward(ids)
        training = backend.module.training
        if (not training and ("nanlogits", g, STEP[0]) in plan) or (training and ("nanloss", g, STEP[0]) in plan):
            logits = logits * float("nan")
        return logits

    def save_and_maybe_die(directory, tag):
        save(directory, tag)
        for kind, who, step in plan:
            if kind == "save" and who == rank and f".tmp_step_{step}" in directory:
                os.kill(os.getpid(), signal.SIGKILL)

    backend.forward, backend.save = fwd, save_and_maybe_die


def weights_digest(job) -> str:
    params = list(job.backend.module.parameters())
    if job.cfg.backend.name == "fsdp":
        return hashlib.sha1(b"".join(digest(p.full_tensor()).encode() for p in params)).hexdigest()[:16]
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return hashlib.sha1(b"".join(digest(p.data).encode() for p in params)).hexdigest()[:16]


def run_one(out: Path, cfg) -> None:
    """One training run in this process, its records starting empty, its results under OUT."""
    STEP[0] = 0
    PLAN[:] = faults()
    RECORD.clear()
    RECORD.update(sent={}, recv={}, start_step=None)
    for reset in RESETS:
        reset(out)
    train.run(cfg)
    job = JOBS[-1]
    del JOBS[:-1]  # the previous runs' replicas
    from codistill_ds.backends.base import evaluating

    batch = job.loop.val_batches[0]
    with evaluating(job.backend):
        logits = job.backend.forward(batch[:, :-1])
        if hasattr(logits, "full_tensor"):  # tensor parallel: vocab-sharded DTensor logits
            logits = logits.full_tensor()
        logits = logits.float()
    t = job.topology
    if t.dims.is_leader:
        torch.save({"tokens": batch, "logits": logits}, out / f"logits_group{t.group_id}.pt")
    result = {"rank": t.rank, "group": t.group_id, "start_step": RECORD["start_step"],
              "checkpoints_at_start": RECORD["checkpoints_at_start"],
              "sent": RECORD["sent"], "recv": RECORD["recv"], "weights": weights_digest(job),
              "restored_weights": RECORD.get("restored_weights"),
              "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
    teachers = job.loop.teachers
    if teachers is not None:  # weight exchange: what each teacher holds, what I sent last
        from codistill_ds.exchange.weights import digest as shard_digest

        result.update(teachers={str(g): shard_digest(w.shards()) for g, w in teachers.teachers.items()},
                      last_sent=teachers.last_sent_digest, teacher_groups=teachers.peer_groups,
                      weight_bytes=teachers.bytes_sent)
    (out / f"rank{t.rank}.json").write_text(json.dumps(result))


def main() -> None:
    out, config = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    install(int(os.environ.get("RANK", "0")))
    for run_out, sets in split_runs(out, sys.argv[3:]):
        run_one(run_out, load_config(config, sets))
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()

"""Checkpoints: every `train.save_interval` steps, atomically; resume from the newest complete one.

A codistillation job is K replicas plus the exchange in flight between them. Per group:

| state | stored in | note |
|---|---|---|
| weights, fp32 master copy, optimizer moments | group_g/engine/ | `backend.save`: DeepSpeed `save_checkpoint`, FSDP2 `torch.distributed.checkpoint` over the group |
| data-stream positions | the step | streams are pure functions of (seed, group, step) (data.py) |
| RNG states (python, numpy, torch, CUDA) | group_g/rank_r.pt, per rank | dropout draws |
| peer predictions waiting for their consumption step (codistill.staleness > 0), exchange byte counter, skipped peers, best validation loss | group_g/rank_r.pt | `CodistillLoop.state_dict`; in-flight exchanges are completed first |
| lr, alpha, weight-decay and dropout schedules | nothing | functions of the step (schedules.py) |

Layout and atomicity:

    RUN_DIR/checkpoints/step_N/                  complete: has COMPLETE, the only kind ever loaded
    RUN_DIR/checkpoints/step_N/COMPLETE          written last
    RUN_DIR/checkpoints/step_N/meta.json         world, groups, backend, vocab, resolved config
    RUN_DIR/checkpoints/step_N/group_g/engine/   backend.save
    RUN_DIR/checkpoints/step_N/group_g/rank_r.pt
    RUN_DIR/checkpoints/.tmp_step_N/             a save in progress, or one a crash interrupted

Every rank writes into .tmp_step_N; each group leader fsyncs its group's files; after a world
barrier (every rank has finished) global rank 0 writes meta.json and COMPLETE, fsyncs, renames
the directory to step_N and fsyncs the parent. A crash anywhere before the rename leaves only
the .tmp directory, which is never loaded; the previous step_M is never touched. DeepSpeed's
`save_checkpoint` barriers over the whole world, so all groups save at the same step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, fields, is_dataclass, replace

import numpy as np
import torch

from codistill_ds.config import Config, ConfigError, config_to_dict
from codistill_ds.distributed import comm
from codistill_ds.distributed import env as rankinfo
from codistill_ds.run.metrics import METRICS_FILE

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
ENGINE_TAG = "engine"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---- finding checkpoints (filesystem only: usable before any process group exists) --------------

def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under RUN_DIR/checkpoints, oldest first."""
    root = checkpoints_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


@dataclass
class Resume:
    """Where this run starts: `path` None means step 0. `continuing`: a restart or an explicit
    resume, so records past the start step in metrics.jsonl belong to an abandoned attempt."""

    path: str | None
    continuing: bool


def resolve_resume(cfg: Config, world_size: int, restarts: int) -> Resume:
    """Apply `train.resume` ("auto" under a torchrun restart); raise ConfigError on a bad choice."""
    mode = "auto" if restarts > 0 and cfg.train.resume == "none" else cfg.train.resume
    existing = complete_checkpoints(cfg.run_dir)
    if mode == "none":
        if existing:
            raise ConfigError("train.resume", f"{checkpoints_root(cfg.run_dir)} already holds "
                              f"checkpoints of an earlier run (newest: step {existing[-1][0]}); pass "
                              "--resume to continue it, or choose a new run_dir")
        return Resume(None, False)
    path = existing[-1][1] if mode == "auto" and existing else None
    if mode not in ("auto", "none"):
        path = _explicit(mode, existing)
    if path is not None:
        check_compatible(read_meta(path), cfg, world_size, path)
    return Resume(path, True)


def _explicit(path: str, existing: list[tuple[int, str]]) -> str:
    if not os.path.isdir(path):
        raise ConfigError("train.resume", f"no such checkpoint or run directory: {path}")
    if not is_complete(path):
        inside = latest_checkpoint(path)
        if inside is None:
            why = ("an incomplete checkpoint (no COMPLETE marker: its save was interrupted)"
                   if _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
                   else "neither a complete checkpoint nor a run dir holding one")
            raise ConfigError("train.resume", f"{path} is {why}")
        path = inside
    step = read_meta(path)["step"]
    newer = [s for s, p in existing if s > step]
    if newer and os.path.samefile(os.path.dirname(os.path.normpath(path)), os.path.dirname(existing[0][1])):
        raise ConfigError("train.resume", f"resuming from step {step} while this run dir already "
                          f"has newer checkpoints (steps {newer}); a later restart would pick those "
                          "up. Move them away or resume into a new run_dir")
    return path


def check_compatible(meta: dict, cfg: Config, world_size: int, path: str) -> None:
    """Shards are per rank and per architecture: the resuming job must match the saving one."""
    groups = cfg.codistill.group_slots if cfg.codistill.enabled else 1
    checks = [("backend.name", meta["backend"], cfg.backend.name),
              ("codistill.groups", meta["groups"], groups),
              ("world_size", meta["world_size"], world_size),
              ("model", meta["config"]["model"], config_to_dict(cfg)["model"])]
    for field, saved, now in checks:
        if saved != now:
            raise ConfigError(field, f"checkpoint {path} was saved with {field}={saved}, this run "
                              f"has {now}; resume with the same value or start a new run_dir")


# ---- saving ---------------------------------------------------------------------------------------

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush every file and directory under `path` to disk (rename is only atomic, not durable)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(job, step: int) -> str:
    """Checkpoint after `step` completed steps; collective over the whole world."""
    t, cfg = job.topology, job.cfg
    root = checkpoints_root(cfg.run_dir)
    tmp, final = os.path.join(root, f".tmp_step_{step}"), os.path.join(root, f"step_{step}")
    loop_state = job.loop.state_dict()  # waits for in-flight exchanges: their targets are state
    if t.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that a crash interrupted
        os.makedirs(tmp)
    comm.barrier()
    group_dir = os.path.join(tmp, f"group_{t.group_id}")
    os.makedirs(group_dir, exist_ok=True)
    job.backend.save(group_dir, ENGINE_TAG)
    rank_file = os.path.join(group_dir, f"rank_{t.position}.pt")
    torch.save({"step": step, "rank": t.rank, "rng": rng_state(), "loop": loop_state}, rank_file)
    comm.barrier(t.group)
    if t.is_leader:
        fsync_tree(group_dir)
    comm.barrier()  # every rank of every group has written and synced
    if t.rank == 0:
        _commit(tmp, final, _meta(job, step))
        prune(cfg.run_dir, cfg.train.keep_checkpoints)
    comm.barrier()  # nobody trains on before the checkpoint is complete
    return final


def _meta(job, step: int) -> dict:
    t = job.topology
    return {"step": step, "world_size": t.dims.world_size, "groups": t.groups,
            "group_size": t.group_size, "backend": job.cfg.backend.name,
            "vocab_size": int(job.backend.module.config.vocab_size), "engine_tag": ENGINE_TAG,
            "schedules": "lr, alpha, weight decay and dropout are functions of the step",
            "time": time.time(), "config": config_to_dict(job.cfg)}


def _commit(tmp: str, final: str, meta: dict) -> None:
    """meta and COMPLETE last, then one rename: a directory named step_N is always whole."""
    _write_file(os.path.join(tmp, META), json.dumps(meta, indent=1))
    _write_file(os.path.join(tmp, COMPLETE), json.dumps({"step": meta["step"], "time": meta["time"]}))
    _fsync_path(tmp)
    old = None
    if os.path.exists(final):  # the same step saved again after resuming from an older one
        old = f"{os.path.dirname(final)}/.old_{os.path.basename(final)}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(os.path.dirname(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prune(run_dir: str, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints (0 keeps all) and stale temp dirs."""
    found = complete_checkpoints(run_dir)
    if keep > 0:
        for _, path in found[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    newest = found[-1][0] if found else -1
    root = checkpoints_root(run_dir)
    for name in os.listdir(root):
        m = re.match(r"^\.tmp_step_(\d+)$", name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class Saver:
    """When to save: every `train.save_interval` steps and after the last step (for export)."""

    def __init__(self, job) -> None:
        self.job, self.every, self.last = job, job.cfg.train.save_interval, job.cfg.train.steps

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last)

    def save(self, step: int) -> str:
        return save(self.job, step)


# ---- resuming ---------------------------------------------------------------------------------------

def restore(job, resume: Resume) -> tuple[int, dict | None]:
    """Load `resume.path` into the job; return the step to continue from (0: fresh start) and
    this rank's saved RNG states, which the caller sets (`set_rng_state`) right before the loop
    so that nothing in between can shift the dropout stream."""
    t = job.topology
    step, rng = 0, None
    if resume.path is not None:
        group_dir = os.path.join(resume.path, f"group_{t.group_id}")
        job.backend.load(group_dir, ENGINE_TAG)
        # Our own file: RNG tuples and pending targets. Read onto the CPU (RNG states must stay
        # there), then the loop's tensors go where the model computes: restored peer targets
        # meet CUDA log-probabilities in the distillation loss and in the next exchange.
        state = torch.load(os.path.join(group_dir, f"rank_{t.position}.pt"), map_location="cpu",
                           weights_only=False)
        job.loop.load_state_dict(to_device(state["loop"], rankinfo.device()))
        step, rng = state["step"], state["rng"]
    if resume.continuing and t.rank == 0:
        truncate_metrics(job.cfg.run_dir, step)
    comm.barrier()
    return step, rng


def to_device(obj, device: torch.device):
    """`obj` with every tensor inside (dicts, lists, tuples, dataclasses) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: to_device(getattr(obj, f.name), device) for f in fields(obj)})
    return obj


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop records of steps after `step`: they belong to the attempt that crashed, and the
    resumed run writes them again (identically, the streams and RNG being restored)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if _record_step(ln) <= step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a line torn by the crash: drop it

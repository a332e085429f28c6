"""The hetero regime (issue 14): a small model codistilled with the benchmark model, and its rivals.

Codistillation exchanges predictions only, so the two groups need not train the same model.
Arms (each model trains on its own half of the corpus, as in every codistill arm):

    hetero-pair       two `codistill-ds train` jobs over `transport: torchft`, meeting through a
                      Lighthouse started here: group 0 the benchmark model, group 1 the small one
                      (the exchange contract compares vocabulary, corpus, batch and wire fields
                      only, so different architectures may join); shared exchange stream (what
                      the torchft transport supports)
    small-offline     the small model (group 1's half, group 1's init) distilled offline, every
                      step, from a frozen teacher: the benchmark model trained first like `sync`
                      (all the training data, global batch 2b) and kept at its best validation
                      loss; the same loss, wire format (top-32 bf16) and alpha as the pair
    (CLI arms)        codistill-shared (the benchmark model with a peer of its own size, same
                      exchange settings), independent and small-independent (each model alone),
                      sync (the teacher's recipe)

    python -m benchmarks.quality.hetero --run-dir D --teacher-set K=V ... --set K=V ...
        # the offline student (one process); benchmarks/quality runs it through `offline_starter`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from codistill_ds.config import Config, load_config, save_config
from codistill_ds.data.corpus import build_corpus
from codistill_ds.run.metrics import MetricsWriter

from .plain import OfflineTeacher, PlainTrainer
from .settings import StopRule


def pair_starter(sets_by_group: list[list[str]]):
    """A runner.Starter: a Lighthouse in this process and one 1-rank CLI job per group, each
    writing under RUN_DIR/group<g>."""
    from codistill_ds.commands.lighthouse import start_lighthouse

    from .runner import popen

    def start(run_dir: Path) -> tuple[list[subprocess.Popen], Callable[[], None]]:
        os.environ.setdefault("RUST_LOG", "warn")
        server, url = start_lighthouse(port=0, bind="127.0.0.1")
        procs = []
        for g, sets in enumerate(sets_by_group):
            job_dir = run_dir / f"group{g}"
            job_dir.mkdir()
            extra = ["codistill.transport=torchft", f"codistill.group_id={g}", f"codistill.lighthouse={url}"]
            cmd = [sys.executable, "-m", "codistill_ds.cli", "train", "--run-dir", str(job_dir), "--nproc", "1"]
            for item in sets + extra:
                cmd += ["--set", item]
            procs.append(popen(cmd, job_dir, "train"))
        return procs, server.shutdown

    return start


def offline_starter(teacher_sets: list[str], sets: list[str]):
    """A runner.Starter: the offline student's process."""
    from .runner import popen

    def start(run_dir: Path) -> tuple[list[subprocess.Popen], Callable[[], None]]:
        cmd = [sys.executable, "-m", "benchmarks.quality.hetero", "--run-dir", str(run_dir)]
        cmd += [a for item in teacher_sets for a in ("--teacher-set", item)]
        cmd += [a for item in sets for a in ("--set", item)]
        return [popen(cmd, run_dir, "offline")], lambda: None

    return start


def train_teacher(cfg: Config, corpus, run_dir: Path, rule: StopRule) -> torch.nn.Module:
    """The benchmark model trained like `sync`, until it has passed its minimum (or the cap);
    returns it frozen at its best validation loss. Its records go to RUN_DIR/teacher/."""
    teacher = PlainTrainer(cfg, corpus, 0, 1, init_seed=cfg.seed)
    writer = MetricsWriter(str(run_dir / "teacher"), enabled=True)
    (run_dir / "teacher").mkdir(exist_ok=True)
    history: list[tuple[int, float]] = []
    best: list[torch.Tensor] = []
    for step in range(cfg.train.steps):
        loss = teacher.train_step(step)
        done = step + 1
        if done % cfg.train.eval_interval and done != cfg.train.steps:
            continue
        val = teacher.evaluate()
        if not history or val < min(v for _, v in history):
            best = [p.detach().clone() for p in teacher.model.parameters()]
        history.append((done, val))
        writer.write({"step": done, "group": 0, "loss": loss, "val_loss": val})
        if rule.passed([history]):
            break
    with torch.no_grad():
        for p, w in zip(teacher.model.parameters(), best):
            p.copy_(w)
            p.requires_grad_(False)
    return teacher.model.eval()


def offline(args: argparse.Namespace) -> None:
    tcfg, cfg = load_config(None, args.teacher_set), load_config(None, args.set)
    run_dir = Path(args.run_dir)
    save_config(cfg, str(run_dir / "config.yaml"))
    corpus = build_corpus(cfg.data)
    teacher = train_teacher(tcfg, corpus, run_dir, StopRule())
    group = 1  # the small model's half and initialization in the pair
    student = PlainTrainer(cfg, corpus, group, cfg.codistill.groups, init_seed=cfg.seed + group,
                           teachers=OfflineTeacher(teacher, cfg))
    tc, alpha = cfg.train, cfg.codistill.alpha
    writer = MetricsWriter(str(run_dir), enabled=True)
    started = time.perf_counter()
    for step in range(tc.steps):
        loss = student.train_step(step)
        done = step + 1
        record = {"step": done, "group": group, "loss": loss, "alpha": alpha, "cross_group_bytes": 0,
                  "wall_s": time.perf_counter() - started}
        if done % tc.eval_interval == 0 or done == tc.steps:
            record["val_loss"] = student.evaluate()
        if done % tc.log_interval == 0 or "val_loss" in record:
            writer.write(record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.hetero", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    offline(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

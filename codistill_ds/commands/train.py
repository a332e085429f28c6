"""`codistill-ds train`: one rank of a codistillation job, or `--nproc N` local ranks.

    codistill-ds train --config examples/tiny_cpu.yaml --nproc 4            # laptop: spawns 4 ranks
    torchrun --nproc_per_node 4 -m codistill_ds.cli train --config ...      # any launcher works:
    deepspeed --num_gpus 4 --module codistill_ds.cli train --config ...     #   each rank runs `train`
    codistill-ds train --config ... --resume                                # newest checkpoint

Input errors (a bad config field, a bad data file, a topology that does not divide) end every
rank with the same one line and exit code 2, after the other ranks have reported too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

INPUT_ERROR_WAIT_S = 30.0
"""Longest wait for the other ranks to report: a rank that validated fine is not coming."""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults apply when omitted)")
    p.add_argument("--run-dir", help="overrides run_dir")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set codistill.alpha=0.5 train.steps=100 "
                        "(repeatable)")
    p.add_argument("--nproc", type=int, default=0,
                   help="start this many local ranks with torchrun instead of running as one rank")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|none|PATH",
                   help="continue from the newest complete checkpoint in the run dir (bare flag), "
                        "or from PATH; sets train.resume")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def spawn_local(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: re-run this command under torchrun with N local ranks."""
    from codistill_ds.distributed.launching import free_port

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", os.environ.get("MASTER_PORT", str(free_port())),
           "-m", "codistill_ds.cli", *rest]
    return subprocess.call(cmd)


def report_input_error(err: Exception) -> int:
    """One line on stderr, then exit code 2, once the other ranks have reported too.

    torchrun and the deepspeed launcher kill the remaining ranks as soon as one exits; waiting
    lets every rank reach its own validation and print the same message, so the user sees the
    cause from every rank rather than a wall of SIGTERMs (env.wait_for_every_rank)."""
    from codistill_ds.distributed.env import wait_for_every_rank

    write_line(f"codistill-ds: error: {err}")
    wait_for_every_rank("input_error", INPUT_ERROR_WAIT_S)
    return 2


def write_line(text: str) -> None:
    """One line to stderr in one write: ranks sharing a pipe then never split each other's
    lines (a pipe write up to 4 KB is atomic)."""
    import os

    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (text.replace("\n", " ") + "\n").encode())


def main_guarded(cfg) -> int:
    """Run one rank; turn input errors into one line on stderr and exit code 2, on every rank."""
    from codistill_ds.distributed import env as rankinfo
    from codistill_ds.run.job import INPUT_ERRORS, run

    try:
        run(cfg)
    except INPUT_ERRORS as err:
        rankinfo.destroy()
        return report_input_error(err)
    except BaseException:
        rankinfo.destroy()
        raise
    rankinfo.shutdown()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc:  # before the config (and torch) is imported: this process only starts torchrun
        return spawn_local(args.nproc, args.argv)
    from codistill_ds.config import ConfigError, load_config

    overrides = list(args.set) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    overrides += [f"train.resume={args.resume}"] if args.resume else []
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        return report_input_error(err)
    from codistill_ds.distributed.env import exit_process

    exit_process(main_guarded(cfg))  # skip finalization: see env.exit_process

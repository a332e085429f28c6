"""The `codistill-ds` command: train, plan, plot.

    codistill-ds train --config examples/tiny_cpu.yaml --nproc 4            # laptop: spawns 4 ranks
    torchrun --nproc_per_node 4 -m codistill_ds.cli train --config ...      # any launcher works:
    deepspeed --num_gpus 4 --module codistill_ds.cli train --config ...     #   each rank runs `train`
    codistill-ds plan --params 1B --world 16 --groups 2                     # bytes per step
    codistill-ds plot runs/demo                                             # PNG curves
    codistill-ds train --config ... --resume                                # newest checkpoint
    codistill-ds export runs/demo --group 0 out/model                       # HF save_pretrained
    codistill-ds lighthouse --port 29510                                    # groups as separate jobs
    codistill-ds tokenize corpus/*.txt --out data/shards                     # once, then train with
                                                        #   --set data.train_files=[data/shards]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train K codistilling replicas (one process per rank)")
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


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="one group's model as a Hugging Face save_pretrained folder")
    p.add_argument("run_dir")
    p.add_argument("out", help="output folder for AutoModelForCausalLM.from_pretrained")
    p.add_argument("--group", type=int, required=True, help="which codistillation group's replica")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


def cmd_export(args: argparse.Namespace) -> int:
    from codistill_ds.config import ConfigError
    from codistill_ds.commands.export import ExportError, export

    try:
        path = export(args.run_dir, args.group, args.out, args.step)
    except (ExportError, ConfigError) as err:
        print(f"codistill-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"exported group {args.group} from {path} to {args.out}")
    return 0


def _tokenize_parser(sub) -> None:
    from codistill_ds.data.tokenize import SHARD_TOKENS

    p = sub.add_parser("tokenize", help="text/JSONL files into memory-mapped token shards, once")
    p.add_argument("files", nargs="+", help="UTF-8 text or JSONL files, read in this order")
    p.add_argument("--out", required=True, help="new directory for the shards and index.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"],
                   help="auto: JSONL when every file ends in .jsonl/.json, else text")
    p.add_argument("--text-field", default="text", help="the JSONL key holding the document text")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from codistill_ds.data.sources import DataError
    from codistill_ds.data.tokenize import tokenize_files

    try:
        index = tokenize_files(args.files, args.out, args.tokenizer, args.format, args.text_field,
                               args.shard_tokens)
    except DataError as err:
        print(f"codistill-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"{index.tokens:,} tokens ({index.dtype}, vocab {index.vocab_size}) in {len(index.shards)} "
          f"shard(s) at {args.out}; digest {index.digest[:16]}")
    return 0


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="PNG curves (loss, val loss, agreement) from a run dir")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def build_parser() -> argparse.ArgumentParser:
    from codistill_ds.plan.bytes import add_plan_arguments

    parser = argparse.ArgumentParser(prog="codistill-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_plan_arguments(sub.add_parser("plan", help="topology and per-step cross-group bytes"))
    _plot_parser(sub)
    _export_parser(sub)
    from codistill_ds.commands.lighthouse import add_lighthouse_arguments

    add_lighthouse_arguments(sub.add_parser("lighthouse", help="meeting point of groups that run as "
                                            "separate jobs (codistill.transport=torchft)"))
    _tokenize_parser(sub)
    return parser


def spawn_local(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: re-run this command under torchrun with N local ranks."""
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", os.environ.get("MASTER_PORT", str(_free_port())),
           "-m", "codistill_ds.cli", *rest]
    return subprocess.call(cmd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_input_error(err: Exception) -> int:
    """One line on stderr, then exit code 2, once the other ranks have reported too.

    torchrun and the deepspeed launcher kill the remaining ranks as soon as one exits; waiting
    lets every rank reach its own validation and print the same message, so the user sees the
    cause from every rank rather than a wall of SIGTERMs (dist.wait_for_every_rank)."""
    from codistill_ds.distributed.env import wait_for_every_rank

    print(f"codistill-ds: error: {err}", file=sys.stderr, flush=True)
    wait_for_every_rank("input_error", INPUT_ERROR_WAIT_S)
    return 2


INPUT_ERROR_WAIT_S = 30.0
"""Longest wait for the other ranks to report: a rank that validated fine is not coming."""


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from codistill_ds.config import ConfigError, load_config

    if args.nproc:
        return spawn_local(args.nproc, argv)
    overrides = list(args.set) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    overrides += [f"train.resume={args.resume}"] if args.resume else []
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        return report_input_error(err)
    from codistill_ds.distributed.env import exit_process
    from codistill_ds.run.job import main_guarded

    exit_process(main_guarded(cfg))  # skip finalization: see dist.exit_process


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args, argv)
    if args.command == "plan":
        from codistill_ds.plan.bytes import run_plan

        return run_plan(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "tokenize":
        return cmd_tokenize(args)
    if args.command == "lighthouse":
        from codistill_ds.commands.lighthouse import run_lighthouse

        return run_lighthouse(args)
    from codistill_ds.commands.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

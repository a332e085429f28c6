"""The `codistill-ds` command: the entry point only registers the subcommands (`commands/`).

    codistill-ds train --config examples/tiny_cpu.yaml --nproc 4            # laptop: spawns 4 ranks
    torchrun --nproc_per_node 4 -m codistill_ds.cli train --config ...      # any launcher works:
    deepspeed --num_gpus 4 --module codistill_ds.cli train --config ...     #   each rank runs `train`
    codistill-ds plan --params 1B --world 16 --groups 2                     # bytes per step
    codistill-ds plot runs/demo                                             # PNG curves
    codistill-ds train --config ... --resume                                # newest checkpoint
    codistill-ds export runs/demo --group 0 out/model                       # HF save_pretrained
    codistill-ds lighthouse --port 29510                                    # groups as separate jobs
    codistill-ds retire runs/group2                                         # such a group leaves for good
    codistill-ds tokenize corpus/*.txt --out data/shards                     # once, then train with
                                                        #   --set data.train_files=[data/shards]
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("train", "plan", "plot", "export", "lighthouse", "retire", "tokenize")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, or `only` that one: some register from modules that import torch, and
    `train --nproc N` (a parent that only starts torchrun) or `lighthouse` need not pay for it."""
    def wanted(name: str) -> bool:
        return only is None or only == name

    parser = argparse.ArgumentParser(prog="codistill-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    if wanted("train"):
        from codistill_ds.commands.train import add_train_parser

        add_train_parser(sub)
    if wanted("plan"):
        from codistill_ds.commands.plan import add_plan_arguments

        add_plan_arguments(sub.add_parser("plan", help="topology and per-step cross-group bytes"))
    if wanted("plot"):
        from codistill_ds.commands.plot import add_plot_parser

        add_plot_parser(sub)
    if wanted("export"):
        from codistill_ds.commands.export import add_export_parser

        add_export_parser(sub)
    if wanted("lighthouse"):
        from codistill_ds.commands.lighthouse import add_lighthouse_arguments

        add_lighthouse_arguments(sub.add_parser("lighthouse", help="meeting point of groups that run as "
                                                "separate jobs (codistill.transport=torchft)"))
    if wanted("retire"):
        from codistill_ds.commands.retire import add_retire_arguments

        add_retire_arguments(sub.add_parser("retire", help="a group running as its own job (transport "
                                            "torchft) leaves for good: the others stop waiting for it"))
    if wanted("tokenize"):
        from codistill_ds.commands.tokenize import add_tokenize_parser

        add_tokenize_parser(sub)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (None: none, or --help before it)."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if arg in COMMANDS:
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    if args.command == "train":
        from codistill_ds.commands.train import cmd_train

        return cmd_train(args, argv)
    import importlib

    handlers = {"plan": "run_plan", "export": "cmd_export", "tokenize": "cmd_tokenize",
                "lighthouse": "run_lighthouse", "plot": "cmd_plot", "retire": "run_retire"}
    module = importlib.import_module(f"codistill_ds.commands.{args.command}")
    return getattr(module, handlers[args.command])(args)


if __name__ == "__main__":
    sys.exit(main())

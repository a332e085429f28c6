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
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand of `codistill_ds.commands.NAME`: its module is imported only when the command
    is the one that runs (some import torch, and `train --nproc N`, a parent that only starts
    torchrun, or `lighthouse` need not pay for it)."""

    help: str
    add_arguments: str
    """The module's function that fills the subcommand's parser."""
    run: str
    """The module's function that runs it: args -> exit code."""


COMMANDS: dict[str, Command] = {
    "train": Command("train K codistilling replicas (one process per rank)", "add_train_arguments", "cmd_train"),
    "plan": Command("topology and per-step cross-group bytes", "add_plan_arguments", "run_plan"),
    "plot": Command("PNG curves (loss, val loss, agreement) from a run dir", "add_plot_arguments", "cmd_plot"),
    "export": Command("one group's model as a Hugging Face save_pretrained folder", "add_export_arguments",
                      "cmd_export"),
    "lighthouse": Command("meeting point of groups that run as separate jobs (codistill.transport=torchft)",
                          "add_lighthouse_arguments", "run_lighthouse"),
    "retire": Command("a group running as its own job (transport torchft) leaves for good: the others stop "
                      "waiting for it", "add_retire_arguments", "run_retire"),
    "tokenize": Command("text/JSONL files into memory-mapped token shards, once", "add_tokenize_arguments",
                        "cmd_tokenize"),
}


def _function(name: str, attribute: str):
    return getattr(importlib.import_module(f"codistill_ds.commands.{name}"), attribute)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand (for --help), or `only` that one."""
    parser = argparse.ArgumentParser(prog="codistill-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        if only in (None, name):
            _function(name, command.add_arguments)(sub.add_parser(name, help=command.help))
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
    args.argv = argv  # the command line as given: `train --nproc N` starts itself again under torchrun
    return _function(args.command, COMMANDS[args.command].run)(args)


if __name__ == "__main__":
    sys.exit(main())

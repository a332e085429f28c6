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


def build_parser() -> argparse.ArgumentParser:
    from codistill_ds.commands.export import add_export_parser
    from codistill_ds.commands.lighthouse import add_lighthouse_arguments
    from codistill_ds.commands.plan import add_plan_arguments
    from codistill_ds.commands.plot import add_plot_parser
    from codistill_ds.commands.retire import add_retire_arguments
    from codistill_ds.commands.tokenize import add_tokenize_parser
    from codistill_ds.commands.train import add_train_parser

    parser = argparse.ArgumentParser(prog="codistill-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is used instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_plan_arguments(sub.add_parser("plan", help="topology and per-step cross-group bytes"))
    add_plot_parser(sub)
    add_export_parser(sub)
    add_lighthouse_arguments(sub.add_parser("lighthouse", help="meeting point of groups that run as "
                                            "separate jobs (codistill.transport=torchft)"))
    add_retire_arguments(sub.add_parser("retire", help="a group running as its own job (transport torchft) "
                                        "leaves for good: the others stop waiting for it"))
    add_tokenize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from codistill_ds.commands.train import cmd_train

        return cmd_train(args, argv)
    from codistill_ds.commands import export, lighthouse, plan, plot, retire, tokenize

    commands = {"plan": plan.run_plan, "export": export.cmd_export, "tokenize": tokenize.cmd_tokenize,
                "lighthouse": lighthouse.run_lighthouse, "plot": plot.cmd_plot, "retire": retire.run_retire}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

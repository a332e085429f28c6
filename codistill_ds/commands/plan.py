"""`codistill-ds plan`: the byte budget (and, with sizes, the memory) of a layout, before any run.

    codistill-ds plan --params 1B --world 16 --groups 2 [--micro-batch 4 --hidden 2048 --layers 16]
    codistill-ds plan ... --tp 8 --replicate 1 --gpus-per-node 8 --activation-checkpointing full
    codistill-ds plan ... --link-gbps 10 [--device-tflops 989 --mfu 0.4] [--noise-scale 4.6k]

Any of the group flags (--tp, --replicate, --gpus-per-node, --zero-stage,
--activation-checkpointing, --reduce-dtype) adds the section "inside each group" (plan/group.py);
--link-gbps or --noise-scale adds the predicted step time of sync, DiLoCo and codistillation and
where the batch stands against the critical batch (plan/compute.py); without them the output is
what it was before they existed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from codistill_ds.plan.bytes import DTYPE_BYTES, make_plan
from codistill_ds.plan.format import format_plan
from codistill_ds.plan.units import human_bytes, parse_count


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `codistill-ds plan`; exchange defaults are the training config's defaults."""
    from codistill_ds.config import CodistillConfig
    from codistill_ds.exchange.wire import INDEX_DTYPES, VALUE_DTYPES

    defaults = CodistillConfig()
    add = parser.add_argument
    add("--params", type=parse_count, default=10**9, help="parameters: 1e9, 1B, 350M, 1100000")
    add("--vocab", type=parse_count, default=32000, help="vocabulary size")
    add("--seq-len", type=int, default=2048, help="tokens per sequence")
    add("--batch", type=int, default=16, help="exchange sequences per group per exchange")
    add("--train-batch", type=int, default=None,
        help="training sequences per group per optimizer step (default: --batch)")
    add("--topk", type=int, default=defaults.topk, help="logit entries kept per token; 0 = full vocab")
    add("--interval", type=int, default=defaults.interval, help="optimizer steps per exchange")
    add("--groups", type=int, default=2, help="codistillation groups K, one per node")
    add("--world", type=int, default=16, help="total ranks W")
    add("--dtype", choices=list(VALUE_DTYPES), default=defaults.dtype, help="exchanged value dtype")
    add("--index-dtype", choices=INDEX_DTYPES, default=defaults.index_dtype, help="top-k id dtype")
    add("--token-fraction", type=float, default=defaults.token_fraction,
        help="fraction of each exchange sequence's positions sent")
    add("--grad-dtype", choices=sorted(DTYPE_BYTES), default="bf16",
        help="gradient dtype of the synchronous baselines")
    add("--diloco-h", type=int, default=500, help="DiLoCo inner steps per outer step")
    add("--streaming-h", type=int, default=100, help="Streaming DiLoCo steps per full sync")
    add("--micro-batch", type=int, default=0,
        help="training sequences per rank per micro-step: adds the memory estimate (memory.py)")
    add("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (memory estimate)")
    add("--hidden", type=int, default=0, help="hidden size (memory estimate)")
    add("--layers", type=int, default=0, help="transformer blocks (memory estimate)")
    add("--heads", type=int, default=None, help="attention heads (checked: divisible by --tp)")
    add("--kv-heads", type=int, default=None, help="key/value heads (checked: divisible by --tp)")
    add("--intermediate", type=int, default=None, help="MLP width (checked: divisible by --tp)")
    group = parser.add_argument_group("inside each group (any of these adds the section)")
    group.add_argument("--tp", type=int, default=None, help="T: tensor-parallel ranks per replica (default 1)")
    group.add_argument("--replicate", type=int, default=None, help="R: HSDP replicas inside a group (default 1)")
    group.add_argument("--gpus-per-node", type=int, default=None,
                       help="G: GPUs per node (default: the group size, one group per node)")
    group.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=None,
                       help="3: ZeRO-3 / FSDP2 (HSDP with --replicate; default); 1, 2: DeepSpeed ZeRO-1/2 "
                            "(with AutoTP when --tp > 1)")
    group.add_argument("--activation-checkpointing", choices=("none", "full", "selective"), default=None,
                       help="model.activation_checkpointing: the mode the memory total uses (default none)")
    group.add_argument("--reduce-dtype", choices=("fp32", "bf16"), default=None,
                       help="gradient reduction dtype (FSDP2 here: fp32, the default; DeepSpeed ZeRO-3: bf16)")
    step = parser.add_argument_group("predicted step time (any of --link-gbps, --noise-scale adds the section)")
    step.add_argument("--link-gbps", type=float, default=None,
                      help="bandwidth of the slow link leaving one node, Gbit/s each direction")
    step.add_argument("--device-tflops", type=float, default=989.0,
                      help="peak dense TFLOP/s of one rank in the compute dtype (H100 SXM bf16: 989)")
    step.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak a rank achieves")
    step.add_argument("--noise-scale", type=parse_count, default=None,
                      help="gradient noise scale B_noise in tokens (user-given, or measured: "
                           "python -m benchmarks.onepass); compares the per-group batch with it")
    step.add_argument("--exchange-batch", choices=("train", "shared"), default="train",
                      help="what the peers predict on, for the teacher compute: 'train' (my training "
                           "batch, Anil et al.'s and the benchmark's) or 'shared' (--batch sequences of "
                           "the shared stream, plus a student forward and backward on them)")
    step.add_argument("--alpha", type=float, default=defaults.alpha, help="distillation weight (0: no student work)")
    add("--json", action="store_true", help="print one JSON object instead of the table")


GROUP_FLAGS = ("tp", "replicate", "gpus_per_node", "zero_stage", "activation_checkpointing", "reduce_dtype")


def _group_options(args: argparse.Namespace) -> dict | None:
    """The group flags given, with their defaults filled in; None when none was given."""
    if all(getattr(args, name, None) is None for name in GROUP_FLAGS):
        return None
    return {"tp": args.tp or 1, "replicate": args.replicate or 1, "gpus_per_node": args.gpus_per_node,
            "zero_stage": args.zero_stage or 3, "activation_checkpointing": args.activation_checkpointing or "none",
            "reduce_dtype": args.reduce_dtype or "fp32"}


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for parsed flags; 2 with one line on stderr for impossible inputs."""
    try:
        plan = make_plan(
            params=args.params, vocab=args.vocab, seq_len=args.seq_len, batch=args.batch,
            topk=args.topk, interval=args.interval, groups=args.groups, world=args.world,
            dtype=args.dtype, grad_dtype=args.grad_dtype, index_dtype=args.index_dtype,
            token_fraction=args.token_fraction, train_batch=args.train_batch,
            diloco_h=args.diloco_h, streaming_h=args.streaming_h,
            gpus_per_node=getattr(args, "gpus_per_node", None),
        )
        memory, group = None, None
        options = _group_options(args)
        if options is not None and not (args.micro_batch and args.hidden and args.layers):
            raise ValueError("the section inside each group (--tp, --replicate, ...) needs --micro-batch, "
                             "--hidden and --layers")
        if options is not None:
            from codistill_ds.plan.group import group_plan

            group = group_plan(plan, args.micro_batch, args.hidden, args.layers, grad_accum=args.grad_accum,
                               heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
                               **options)
            memory = group.memory
        elif getattr(args, "micro_batch", 0):
            from codistill_ds.plan.memory import memory_plan

            memory = memory_plan(args.params, args.world, args.groups, args.micro_batch, args.seq_len,
                                 args.hidden, args.layers, args.vocab, args.grad_accum)
        steps = _step_times(args, plan)
    except ValueError as exc:
        print(f"codistill-ds plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        extra = {"memory": asdict(memory)} if memory else {}
        if group is not None:
            extra["group"] = {k: v for k, v in asdict(group).items() if k != "memory"}
        if steps is not None:
            extra["step_times"] = asdict(steps)
        print(json.dumps({**asdict(plan), **extra}))
    else:
        print(format_plan(plan))
        if memory is not None:
            from codistill_ds.plan.memory import format_memory

            print("\n".join(format_memory(memory, plan.exchange_bytes_per_step, human_bytes)))
        if group is not None:
            from codistill_ds.plan.group import format_group

            print("\n".join(format_group(group, human_bytes)))
        if steps is not None:
            from codistill_ds.plan.compute import format_step_times

            print("\n".join(format_step_times(steps, args.groups, args.diloco_h)))
    return 0


def _step_times(args: argparse.Namespace, plan):
    """The step-time section (plan/compute.py) when --link-gbps or --noise-scale is given."""
    if getattr(args, "link_gbps", None) is None and getattr(args, "noise_scale", None) is None:
        return None
    from codistill_ds.plan.compute import DecoderShape, step_times

    shape = DecoderShape(args.params, args.vocab, args.seq_len, args.hidden or None, args.layers or None,
                         args.intermediate, args.heads, args.kv_heads)
    return step_times(plan, shape, args.link_gbps or 100.0, args.device_tflops, args.mfu, args.exchange_batch,
                      args.alpha, args.token_fraction, args.noise_scale)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m codistill_ds.commands.plan --params 1B``."""
    parser = argparse.ArgumentParser(prog="codistill-ds plan", description=__doc__.split("\n")[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

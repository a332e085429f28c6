"""Rank program: examples/accelerate_loop.py's loop (its rows and its model) with gradient
accumulation and a checkpoint, under `accelerate launch` with a DeepSpeed YAML. Args: OUT
--runs NAME=BxA[,NAME=BxA...] --steps N [--save_at S --save_run NAME] [--resume DIR]
[--staleness T].

Each run trains with A micro-batches of B rows per optimizer step; the runs go one after the
other in this process (one launch, so the ranks start once), each from scratch: Accelerate's
shared state is reset, then a new Accelerator, `Codistill`, model, optimizer and DeepSpeed
engine are built. Optimizer step t reads micro-batches t*A .. t*A+A-1 of one seeded shuffle of
the group's rows (B rows each), so A x B rows per step in every run, in the same order.
`--save_at S --save_run NAME` makes run NAME save the Accelerate state (per group,
`codistill.checkpoint_dir`) and `codistill.state_dict()` (per rank) after S steps and train on;
`--resume DIR` makes every run load both and continue from step S of the same shuffle. Writes
OUT/NAME/rank{r}.json: the per-step records of `log_metrics`, the accumulation count Accelerate
and the DeepSpeed engine used, and a checksum of the group's full weights at the end."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs
from accelerate_loop_run import load_example
from partition_check import deepspeed_view
from torch.utils.data import DataLoader

from codistill_ds.config import CodistillConfig
from codistill_ds.integrations.accelerate_loop import Codistill


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--runs", required=True, help="NAME=BATCHxACCUM,...")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--staleness", type=int, default=0)
    p.add_argument("--save_at", type=int, default=0)
    p.add_argument("--save_run", default="")
    p.add_argument("--resume", default="")
    args = p.parse_args(argv)
    args.runs = [(name, *map(int, spec.split("x"))) for name, spec in (r.split("=") for r in args.runs.split(","))]
    return args


def micro_batches(loader: DataLoader, count: int):
    """The first `count` micro-batches of the loader, epoch after epoch."""
    n = 0
    while True:
        for batch in loader:
            if n == count:
                return
            yield n, batch
            n += 1


def train(args: argparse.Namespace, example, name: str, batch_size: int, accum: int) -> None:
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(gradient_accumulation_steps=accum,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rows = example.byte_rows(None, 40_000, 32)
    config = CodistillConfig(groups=2, alpha=1.0, burn_in=0, interval=1, topk=8, staleness=args.staleness)
    codistill = Codistill.from_accelerator(accelerator, config, exchange_dataset=rows, seed=7, exchange_batch_size=4)
    model = example.tiny_llama(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loader = DataLoader(codistill.shard(rows), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(7))
    model, optimizer, loader = codistill.prepare(model, optimizer, loader)
    start = 0
    if args.resume:
        accelerator.load_state(codistill.checkpoint_dir(args.resume))
        state = torch.load(os.path.join(args.resume, f"codistill_rank{accelerator.process_index}.pt"),
                           weights_only=False)
        codistill.load_state_dict(state)
        start = args.save_at
    saves = args.save_at and name == args.save_run and not args.resume
    logs = []
    model.train()
    for n, batch in micro_batches(loader, args.steps * accum):
        step = n // accum
        if step < start:
            continue
        with accelerator.accumulate(model):
            loss = codistill.distill(model(**batch).loss, model, step)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if n % accum == accum - 1:
            logs.append({"step": step + 1, **codistill.log_metrics()})
            if saves and step + 1 == args.save_at:
                accelerator.save_state(codistill.checkpoint_dir(str(out / "ckpt")))
                torch.save(codistill.state_dict(), out / "ckpt" / f"codistill_rank{accelerator.process_index}.pt")
    codistill.close()
    _parts, gathered, full = deepspeed_view(model)
    with gathered():
        checksum = float(sum(p.detach().double().sum() for p in full()))
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "rank": accelerator.process_index, "group": codistill.group_id, "logs": logs, "checksum": checksum,
        "accum": [accelerator.gradient_accumulation_steps, model.gradient_accumulation_steps()],
        "micro_batch": model.train_micro_batch_size_per_gpu()}))
    accelerator.wait_for_everyone()


def main() -> None:
    args = parse(sys.argv[1:])
    example = load_example()
    for name, batch_size, accum in args.runs:
        train(args, example, name, batch_size, accum)
        # The next run's Accelerator starts from the launch environment again (a new DeepSpeed
        # plugin, its own accumulation count); the process group stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


if __name__ == "__main__":
    main()

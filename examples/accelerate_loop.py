"""Codistillation in your own Accelerate training loop: a tiny byte-level Llama.

Two groups of two ranks, ZeRO-3 inside each group (on CPU too; nothing is downloaded: the text
is a local file, or the installed Python standard library's source):

    accelerate launch --config_file launch/accelerate/zero3.yaml examples/accelerate_loop.py --groups 2

`launch/accelerate/zero2.yaml` shards with ZeRO-2 instead; with GPUs an FSDP2 YAML works too
(Accelerate 1.15 runs FSDP only on accelerator devices). The loop is an ordinary Accelerate loop
(`Accelerator`, `accelerator.prepare`, `accelerator.backward`, AdamW, gradient clipping); the
codistillation lines are marked `# codistill`. `--plain` runs the same loop without them on rows
`data_shard::num_shards` with group `data_shard`'s seed: one process with S x the batch is group
g's exact reference while alpha = 0 (tests/dist/test_accelerate_loop.py checks it):

    python examples/accelerate_loop.py --plain --data_shard 1 --num_shards 2 --batch_size 4

Each group its own job (`transport: torchft`: a group that fails costs the others only its
predictions): start `codistill-ds lighthouse --port 29510`, then per group g

    accelerate launch --config_file launch/accelerate/zero3.yaml --num_processes 2 examples/accelerate_loop.py \
        --groups 2 --transport torchft --group_id g --lighthouse http://127.0.0.1:29510
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from codistill_ds.config import CodistillConfig  # codistill
from codistill_ds.integrations.accelerate_loop import Codistill  # codistill


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text_file", help="local text (default: the Python standard library's source)")
    p.add_argument("--max_bytes", type=int, default=100_000)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=2, help="rows per rank and step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="what Accelerate's DeepSpeed config sets")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--groups", type=int, default=2, help="codistillation groups K (the world splits into K)")
    p.add_argument("--same_init", action="store_true", help="every group starts from the same weights")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--burn_in", type=int, default=5, help="steps with alpha = 0")
    p.add_argument("--interval", type=int, default=2, help="steps between exchanges")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--activation_checkpointing", default="none", choices=("none", "full", "selective"),
                   help="recompute each transformer block's activations in backward (same losses, less memory)")
    p.add_argument("--transport", default="world", help="world (one launch, K groups) | torchft (a job per group)")
    p.add_argument("--group_id", type=int, help="--transport torchft: the group this job trains")
    p.add_argument("--lighthouse", help="--transport torchft: http://host:port of `codistill-ds lighthouse`")
    p.add_argument("--plain", action="store_true", help="no codistillation: the reference run")
    p.add_argument("--data_shard", type=int, default=0, help="--plain: train on rows data_shard::num_shards")
    p.add_argument("--num_shards", type=int, default=1)
    return p.parse_args(argv)


def byte_rows(path: str | None, max_bytes: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-length windows of the text's UTF-8 bytes (labels = inputs: the model shifts them)."""
    if path:
        with open(path, "rb") as f:
            data = f.read(max_bytes)
    else:
        from codistill_ds.data.sources import stdlib_sources

        data = "\n".join(stdlib_sources(max_bytes)).encode()[:max_bytes]
    ids = torch.tensor(list(data), dtype=torch.long)
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    return [{"input_ids": w, "labels": w} for w in windows]


def tiny_llama(seq_len: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def batches(loader: DataLoader, steps: int):
    """(step, batch) for `steps` steps, epoch after epoch."""
    step = 0
    while True:
        for batch in loader:
            if step == steps:
                return
            yield step, batch
            step += 1


def main(argv: list[str] | None = None):
    """Train; return (accelerator, model, logs, codistill) for tests/workers/accelerate_loop_run.py."""
    args = parse_args(argv)
    # Launched on CPU, Accelerate 1.15 picks no process-group backend for DeepSpeed: name gloo.
    cpu_launch = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_launch else [])
    rows = byte_rows(args.text_file, args.max_bytes, args.seq_len)
    codistill, prepare, train_rows = None, accelerator.prepare, rows[args.data_shard::args.num_shards]
    if args.plain:  # the reference for group data_shard: its rows, its seed
        set_seed(args.seed + (0 if args.same_init else args.data_shard))
    else:
        config = CodistillConfig(groups=args.groups, same_init=args.same_init, alpha=args.alpha,  # codistill
                                 burn_in=args.burn_in, interval=args.interval, topk=args.topk,  # codistill
                                 transport=args.transport, group_id=args.group_id, lighthouse=args.lighthouse)  # codistill
        codistill = Codistill.from_accelerator(accelerator, config, exchange_dataset=rows, seed=args.seed)  # codistill
        prepare, train_rows = codistill.prepare, codistill.shard(rows)  # codistill: group g trains on rows g::K
    model = tiny_llama(args.seq_len)
    if codistill is not None and args.activation_checkpointing != "none":  # codistill (optional)
        codistill.checkpoint_activations(model, args.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # A seeded shuffle: the same order of rows however many processes split the batches.
    shuffle = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=shuffle)
    model, optimizer, loader = prepare(model, optimizer, loader)

    logs = []
    model.train()
    for step, batch in batches(loader, args.steps):
        loss = model(**batch).loss
        if codistill is not None:
            loss = codistill.distill(loss, model, step)  # codistill: NaN guard, exchange, + alpha * D
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # DeepSpeed: its config's clipping
        optimizer.step()
        optimizer.zero_grad()
        if codistill is None:
            record = {"loss": accelerator.reduce(loss.detach(), "mean").item()}
        else:
            record = codistill.log_metrics()  # codistill: my group's loss, distill_loss, alpha, bytes, ...
        logs.append({"step": step + 1, **record})
        prints = accelerator.is_main_process if codistill is None else codistill.is_leader  # codistill: each group's leader
        if prints:
            print(json.dumps(logs[-1]), flush=True)
    if codistill is not None:
        codistill.close()  # codistill: asynchronous exchanges finish
    accelerator.wait_for_everyone()
    return accelerator, model, logs, codistill


if __name__ == "__main__":
    main()

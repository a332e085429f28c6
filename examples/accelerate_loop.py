"""Codistillation in your own Accelerate training loop: a tiny byte-level Llama.

Two groups of two ranks, ZeRO-3 inside each group (on CPU too; nothing is downloaded: the text
is a local file, or the installed Python standard library's source):

    accelerate launch --config_file launch/accelerate/zero3.yaml examples/accelerate_loop.py --groups 2

`launch/accelerate/zero2.yaml` shards with ZeRO-2 instead; with GPUs an FSDP2 YAML works too
(Accelerate 1.15 runs FSDP only on accelerator devices). The loop is an ordinary Accelerate loop
(`Accelerator`, `accelerator.prepare`, `accelerator.backward`, AdamW); the codistillation lines
are marked `# codistill`. `--plain --data_shard g --num_shards K` runs the same loop without
codistillation on group g's rows with group g's seed: with alpha = 0 (during `--burn_in`) each
group's losses equal that run's, which is what tests/test_accelerate_loop.py checks:

    accelerate launch --config_file launch/accelerate/zero3.yaml --num_processes 2 \\
        examples/accelerate_loop.py --plain --data_shard 1 --num_shards 2
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text_file", help="local text (default: the Python standard library's source)")
    p.add_argument("--max_bytes", type=int, default=100_000)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=2, help="rows per rank and step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--groups", type=int, default=2, help="codistillation groups K (the world splits into K)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--burn_in", type=int, default=5, help="steps with alpha = 0")
    p.add_argument("--interval", type=int, default=2, help="steps between exchanges")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--plain", action="store_true", help="no codistillation: the reference run")
    p.add_argument("--data_shard", type=int, default=0, help="--plain: train on rows data_shard::num_shards")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--results_json", help="write each rank's logs, partitions and weight checksum here")
    return p.parse_args()


def byte_rows(path: str | None, max_bytes: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-length windows of the text's UTF-8 bytes (labels = inputs: the model shifts them)."""
    if path:
        with open(path, "rb") as f:
            data = f.read(max_bytes)
    else:
        from codistill_ds.sources import stdlib_sources

        data = "\n".join(stdlib_sources(max_bytes)).encode()[:max_bytes]
    ids = torch.tensor(list(data), dtype=torch.long)
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    return [{"input_ids": w, "labels": w} for w in windows]


def tiny_llama(seq_len: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def main() -> None:
    args = parse_args()
    # On CPU, Accelerate 1.15 picks no process-group backend for DeepSpeed: name gloo.
    accelerator = Accelerator(kwargs_handlers=[] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")])
    rows = byte_rows(args.text_file, args.max_bytes, args.seq_len)
    codistill = None
    if args.plain:  # the reference for group g: its rows, its seed
        set_seed(args.seed + args.data_shard)
        train_rows = rows[args.data_shard::args.num_shards]
    else:
        config = CodistillConfig(groups=args.groups, alpha=args.alpha, burn_in=args.burn_in,  # codistill
                                 interval=args.interval, topk=args.topk)  # codistill
        codistill = Codistill.from_accelerator(accelerator, config, exchange_dataset=rows, seed=args.seed)  # codistill
        train_rows = codistill.shard(rows)  # codistill: group g trains on rows g, g+K, ...
    model = tiny_llama(args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, drop_last=True)
    prepare = accelerator.prepare if codistill is None else codistill.prepare  # codistill
    model, optimizer, loader = prepare(model, optimizer, loader)

    logs, step = [], 0
    model.train()
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            if codistill is not None:
                loss = codistill.distill(loss, model, step)  # codistill: NaN guard, exchange, + alpha * D
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if codistill is None:
                record = {"loss": accelerator.reduce(loss.detach(), "mean").item()}
            else:
                record = codistill.log_metrics()  # codistill: my group's loss, distill_loss, alpha, bytes, ...
            logs.append({"step": step, **record})
            if (codistill is None and accelerator.is_main_process) or (codistill is not None and codistill.is_leader):
                print(json.dumps(logs[-1]), flush=True)
            if step == args.steps:
                break
    if codistill is not None:
        codistill.close()  # codistill: asynchronous exchanges finish
    if args.results_json:
        write_results(args.results_json, model, logs, codistill)
    accelerator.wait_for_everyone()


def write_results(directory: str, model, logs: list[dict], codistill) -> None:
    """Per-rank facts the test checks: each parameter's local and full size (ZeRO-1/2: each flat
    optimizer partition's), a checksum of the full weights, the log records."""
    params = list(model.parameters())
    if hasattr(params[0], "ds_numel"):  # ZeRO-3
        import deepspeed

        parts = [[int(p.ds_tensor.numel()), int(p.ds_numel)] for p in params]
        with deepspeed.zero.GatheredParameters(params):
            checksum = float(sum(p.detach().double().sum() for p in params))
    else:
        optim = getattr(model, "optimizer", None)  # a ZeRO-1/2 engine partitions the optimizer state
        parts = [[int(flat.numel()), sum(int(p.numel()) for p in group)]
                 for group, flat in zip(optim.bit16_groups, optim.single_partition_of_fp32_groups)]
        checksum = float(sum(p.detach().double().sum() for p in params))
    rank = torch.distributed.get_rank()
    facts = {"rank": rank, "parts": parts, "checksum": checksum, "logs": logs,
             "group": None if codistill is None else codistill.group_id}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()

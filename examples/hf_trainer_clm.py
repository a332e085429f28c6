"""Codistillation in an ordinary Hugging Face `Trainer` script: a tiny byte-level Llama.

Two groups of two ranks on CPU, ZeRO-3 inside each group (nothing is downloaded: the corpus is
a local text file, or the installed Python standard library's source):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 examples/hf_trainer_clm.py \
        --deepspeed ds_configs/zero3.json --groups 2 --output-dir runs/hf_clm

With GPUs, FSDP2 inside each group (Accelerate runs FSDP only on accelerator devices):

    torchrun --nproc_per_node 4 examples/hf_trainer_clm.py --fsdp --groups 2 --output-dir runs/hf_fsdp

`--groups 0` runs the very same script as a plain Trainer job (no callback, no mixin);
`--data-shard g --num-shards K` then trains on group g's data, which is how the tests check that
codistillation with alpha = 0 reproduces the plain Trainer's losses:

    deepspeed --num_gpus 2 examples/hf_trainer_clm.py --deepspeed ds_configs/zero3.json \
        --groups 0 --data-shard 1 --num-shards 2 --output-dir runs/hf_plain_g1

The codistillation lines are marked `# codistill`; everything else is a plain Trainer script.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from codistill_ds.config import DataConfig
from codistill_ds.data import build_corpus


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/hf_clm")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (ZeRO stage inside each group)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 inside each group instead of DeepSpeed")
    p.add_argument("--groups", type=int, default=2, help="codistillation groups K; 0 = plain Trainer")
    p.add_argument("--data-shard", type=int, default=0, help="plain runs: train on shard g ...")
    p.add_argument("--num-shards", type=int, default=1, help="... of this many (group g's data)")
    p.add_argument("--text-file", help="local text corpus (default: the Python stdlib's source)")
    p.add_argument("--max-bytes", type=int, default=300_000)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2, help="per device")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--burn-in", type=int, default=5)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--report-to", default="none")
    p.add_argument("--results-json", help="write per-rank facts (partitions, checksum, logs) here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args()


def byte_datasets(args: argparse.Namespace):
    """Fixed-length byte windows as a `datasets.Dataset` (labels = inputs; the model shifts)."""
    from datasets import Dataset

    data = DataConfig(train_files=[args.text_file] if args.text_file else [], seq_len=args.seq_len,
                      max_bytes=args.max_bytes, val_fraction=0.02)
    corpus = build_corpus(data)
    def as_dataset(rows: torch.Tensor) -> Dataset:
        ids = rows.tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": ids})
    return as_dataset(corpus.train), as_dataset(corpus.val), corpus.vocab_size


def tiny_llama(vocab_size: int, seq_len: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len + 1,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def trainer_ds_config(path: str | None) -> dict | None:
    """The ZeRO JSON with the batch/clipping keys the Trainer fills in set to "auto" (HF's rule)."""
    if path is None:
        return None
    from codistill_ds.config import resolve_path

    with open(resolve_path(path)) as f:
        ds = json.load(f)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        ds[key] = "auto"
    return ds


def cpu_deepspeed_state() -> dict:
    """On a CPU-only machine Accelerate 1.15 picks no backend for DeepSpeed and reports a world of
    one process (so DeepSpeed's batch check fails); configuring its state with gloo first fixes it."""
    if torch.cuda.is_available():
        return {}
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    extra = cpu_deepspeed_state() if args.deepspeed else {}
    if args.fsdp:  # FSDP2 through Accelerate needs GPUs: it does not enable FSDP for CPU processes
        extra.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    return TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, max_steps=args.max_steps, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.1, logging_steps=1, eval_strategy="steps",
        eval_steps=args.burn_in or args.max_steps, save_strategy="no", report_to=args.report_to,
        seed=args.seed, deepspeed=trainer_ds_config(args.deepspeed), disable_tqdm=True, **extra)


class RecordLogs(TrainerCallback):
    """Keeps every log dict on every rank, for --results-json."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def main() -> None:
    args = parse_args()
    train_set, val_set, vocab = byte_datasets(args)
    targs = training_arguments(args)
    record = RecordLogs()
    if args.groups:
        from codistill_ds.config import CodistillConfig  # codistill
        from codistill_ds.integrations.hf_trainer import (  # codistill
            CodistillCallback,
            CodistillTrainerMixin,
        )

        class CodistillTrainer(CodistillTrainerMixin, Trainer):  # codistill
            pass

        codistill = CodistillCallback(CodistillConfig(  # codistill
            groups=args.groups, alpha=args.alpha, burn_in=args.burn_in, interval=args.interval, topk=args.topk))
        set_seed(codistill.group_seed(args.seed))  # codistill: each group draws its own init
        trainer_cls, callbacks = CodistillTrainer, [codistill, record]
    else:  # the reference for group g: its data shard (rows g::K) and its init seed
        train_set = train_set.shard(num_shards=args.num_shards, index=args.data_shard, contiguous=False)
        set_seed(args.seed + args.data_shard)
        trainer_cls, callbacks = Trainer, [record]
    model = tiny_llama(vocab, args.seq_len)
    trainer = trainer_cls(model=model, args=targs, train_dataset=train_set, eval_dataset=val_set,
                          callbacks=callbacks)
    trainer.train()
    if args.results_json:
        write_results(args.results_json, trainer, record.logs)


def write_results(directory: str, trainer: Trainer, logs: list[dict]) -> None:
    """Per-rank facts the tests check: local vs full parameter sizes, a weight checksum, the logs."""
    rank = torch.distributed.get_rank()
    params = list(trainer.model.parameters())
    if hasattr(params[0], "ds_numel"):  # ZeRO-3: local partition vs full size
        import deepspeed

        parts = [[int(p.ds_tensor.numel()), int(p.ds_numel)] for p in params]
        with deepspeed.zero.GatheredParameters(params):
            checksum = float(sum(p.detach().double().sum() for p in params))
    elif hasattr(params[0], "to_local"):  # FSDP2 DTensor shards
        parts = [[int(p.to_local().numel()), int(p.numel())] for p in params]
        checksum = float(sum(p.full_tensor().double().sum() for p in params))
    else:
        parts = [[int(p.numel()), int(p.numel())] for p in params]
        checksum = float(sum(p.detach().double().sum() for p in params))
    engine = trainer.model_wrapped
    facts = {"rank": rank, "parts": parts, "checksum": checksum, "logs": logs,
             "train_rows": len(trainer.train_dataset), "output_dir": trainer.args.output_dir,
             "reports": trainer.state.is_world_process_zero,  # where report_to integrations write
             "total_train_batch_size": trainer.get_total_train_batch_size(trainer.args),
             "engine_train_batch_size": engine.train_batch_size() if hasattr(engine, "train_batch_size") else None}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()

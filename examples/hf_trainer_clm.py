"""Codistillation in an ordinary Hugging Face `Trainer` script: a tiny byte-level Llama.

Two groups of two ranks on CPU, ZeRO-3 inside each group (nothing is downloaded: the corpus is
a local text file, or the installed Python standard library's source):

    deepspeed --num_gpus 4 examples/hf_trainer_clm.py --deepspeed ds_configs/zero3.json \
        --codistill_groups 2 --output_dir runs/hf_clm

With GPUs, FSDP2 inside each group (Accelerate runs FSDP only on accelerator devices):

    torchrun --nproc_per_node 4 examples/hf_trainer_clm.py --fsdp full_shard \
        --fsdp_config '{"fsdp_version": 2}' --codistill_groups 2 --output_dir runs/hf_fsdp

Every `TrainingArguments` and `--codistill_*` flag works (`--help`). The codistillation lines are
marked `# codistill`; everything else is a plain Trainer script. `--codistill_enabled false` runs
the very same script as a plain Trainer job; `--data_shard g --num_shards K` then trains on group
g's data with group g's seed, which is how the tests check that codistillation with alpha = 0
reproduces the plain Trainer's losses:

    deepspeed --num_gpus 2 examples/hf_trainer_clm.py --deepspeed ds_configs/zero3.json \
        --codistill_enabled false --data_shard 1 --num_shards 2 --output_dir runs/hf_plain_g1
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from codistill_ds.config import DataConfig
from codistill_ds.data.corpus import build_corpus
from codistill_ds.integrations.hf_trainer import (  # codistill
    CodistillArguments,
    CodistillTrainer,
    codistill_init,
    use_gloo_for_cpu_deepspeed,
)


@dataclass
class ScriptArguments:
    text_file: str | None = None
    """Local text corpus (default: the Python standard library's source)."""
    max_bytes: int = 300_000
    seq_len: int = 32
    data_shard: int = 0
    """Plain runs (--codistill_enabled false): train on shard g ..."""
    num_shards: int = 1
    """... of this many, with seed + g (group g's data and initialization)."""
    results_json: str | None = None
    """Write per-rank facts (partitions, checksum, logs) into this folder."""


DEFAULTS = {"output_dir": "runs/hf_clm", "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
            "max_steps": 20, "learning_rate": 1e-2, "lr_scheduler_type": "constant", "weight_decay": 0.1,
            "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 5, "save_strategy": "no",
            "report_to": "none", "seed": 7, "disable_tqdm": True}
"""This example's TrainingArguments defaults; any --flag overrides them."""


def byte_datasets(script: ScriptArguments):
    """Fixed-length byte windows as a `datasets.Dataset` (labels = inputs; the model shifts)."""
    from datasets import Dataset

    data = DataConfig(train_files=[script.text_file] if script.text_file else [], seq_len=script.seq_len,
                      max_bytes=script.max_bytes, val_fraction=0.02)
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


class RecordLogs(TrainerCallback):
    """Keeps every log dict on every rank, for --results_json."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments, CodistillArguments))  # codistill
    parser.set_defaults(**DEFAULTS)
    script, args, codistill_args = parser.parse_args_into_dataclasses()  # codistill
    train_set, val_set, vocab = byte_datasets(script)
    record = RecordLogs()
    if codistill_args.codistill_enabled:
        codistill = codistill_init(codistill_args, args)  # codistill: group seed, ZeRO-3 init in-group
        trainer_cls, extra = CodistillTrainer, {"codistill": codistill}  # codistill
    else:  # the reference for group g: its data shard (rows g::K) and its init seed
        use_gloo_for_cpu_deepspeed(args)  # a plain Trainer under `deepspeed` on CPU needs it too
        train_set = train_set.shard(num_shards=script.num_shards, index=script.data_shard, contiguous=False)
        set_seed(args.seed + script.data_shard)
        trainer_cls, extra = Trainer, {}
    model = tiny_llama(vocab, script.seq_len)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                          callbacks=[record], **extra)
    trainer.train()
    if script.results_json:
        write_results(script.results_json, trainer, record.logs)


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
             "saves": trainer.args.should_save,
             "total_train_batch_size": trainer.get_total_train_batch_size(trainer.args),
             "engine_train_batch_size": engine.train_batch_size() if hasattr(engine, "train_batch_size") else None}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()

"""Codistillation in a stock Hugging Face `Trainer` script: five lines, ZeRO-2/3 or FSDP2 inside each group.

The lines a user adds to or changes in a script like transformers' `run_clm.py` (README, "Codistillation
in your Hugging Face Trainer script", has the diff):

    from codistill_ds.integrations.hf_trainer import CodistillArguments, CodistillTrainer, codistill_init
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, CodistillArguments))
    model_args, data_args, training_args, codistill_args = parser.parse_args_into_dataclasses()
    codistill = codistill_init(codistill_args, training_args)   # after set_seed, before the model is built
    trainer = CodistillTrainer(codistill=codistill, model=model, args=training_args, ...)

then `deepspeed --num_gpus 8 run_clm.py --deepspeed ds_configs/zero3.json --codistill_groups 2 ...`
(or FSDP2: `torchrun ... --fsdp full_shard --fsdp_config '{"fsdp_version": 2}'`). The world splits
into K contiguous groups (`topology.py`); each trains one replica, sharded inside the group only,
on its own shard of `train_dataset` (rows g, g+K, ...), and writes everything to
`output_dir/group{g}/`. The pieces:

- `CodistillArguments` (hf_args.py): `--codistill_<field>` for every `CodistillConfig` field.
- `codistill_init` -> `CodistillCallback` (hf_callback.py): process groups, this group's seed
  for the model's initialization (`same_init` for one seed), under ZeRO-3 the in-group
  `deepspeed.zero.Init` that `from_config`/`from_pretrained` enter, Accelerate's CPU state; then
  the exchange engine, the alpha schedule and the failure guard while training.
- `CodistillTrainer` = `CodistillTrainerMixin` (hf_mixin.py) + `Trainer`; `codistill_trainer(cls)`
  does the same for any Trainer subclass.

DeepSpeed configs follow the Trainer's rule: batch keys "auto" (the shipped `ds_configs/zero*.json`
have them; the engine then gets the group's train_batch_size). FSDP2 through the Trainer needs
accelerator devices: Accelerate 1.15 enables FSDP only for accelerator process types
(`AcceleratorState.__init__`: MULTI_GPU, MULTI_XPU, ...; never MULTI_CPU), so on CPU the Trainer
path runs DeepSpeed (the FSDP2 hook itself is tested on CPU, tests/dist/test_hf_trainer.py). FSDP2's
`cpu_ram_efficient_loading` broadcasts global rank 0's weights over the world, so every group
would start from group 0's initialization: leave it off.

Not handled: plain DDP (it all-reduces over the whole world: synchronous training); tensor,
context or sequence parallelism and HSDP (a `ParallelismConfig`, a model loaded with
`tp_plan`/`DistributedConfig`, DeepSpeed `autotp_size`, `fsdp hybrid_shard`: refused with one
line, integrations/model_parallel.py says why; the CLI's `parallel.tp`/`parallel.replicate` do it); `load_best_model_at_end` (the best checkpoint is per group, the flag is not).
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainingArguments

from codistill_ds.integrations.exchange_data import distill_mask
from codistill_ds.integrations.hf_trainer.args import CodistillArguments
from codistill_ds.integrations.hf_trainer.callback import (
    CodistillCallback,
    use_gloo_for_cpu_deepspeed,
)
from codistill_ds.integrations.hf_trainer.mixin import (
    CodistillTrainerMixin,
    refuse_trainer_model_parallelism,
)

__all__ = ["CodistillArguments", "CodistillCallback", "CodistillTrainer", "CodistillTrainerMixin",
           "codistill_init", "codistill_trainer", "distill_mask", "use_gloo_for_cpu_deepspeed"]


def codistill_init(codistill: Any, args: TrainingArguments, **kwargs: Any) -> CodistillCallback:
    """Set up codistillation for the model about to be built; pass the result to the Trainer.

    `codistill`: the `CodistillArguments` of the command line (or a `CodistillConfig`). Call it
    after TrainingArguments (which starts torch.distributed) and after the script's `set_seed`,
    before `from_config`/`from_pretrained`: it seeds this group's initialization and, under
    ZeRO-3, makes the model's `deepspeed.zero.Init` partition inside the group, until the
    Trainer is created. `kwargs` go to `CodistillCallback` (`exchange_dataset`, `transport`)."""
    refuse_trainer_model_parallelism(args)
    callback = CodistillCallback.from_arguments(codistill, **kwargs)
    callback.begin_model_init(args)
    return callback


class CodistillTrainer(CodistillTrainerMixin, Trainer):
    """A `Trainer` that codistills: `CodistillTrainer(codistill=codistill_init(...), model=..., args=...)`."""


_TRAINER_CLASSES: dict[type, type] = {Trainer: CodistillTrainer}


def codistill_trainer(trainer_class: type) -> type:
    """`CodistillTrainerMixin` + an existing Trainer subclass (e.g. TRL's SFTTrainer), made once."""
    if issubclass(trainer_class, CodistillTrainerMixin):
        return trainer_class
    if trainer_class not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[trainer_class] = type(f"Codistill{trainer_class.__name__}",
                                               (CodistillTrainerMixin, trainer_class), {"__module__": __name__})
    return _TRAINER_CLASSES[trainer_class]

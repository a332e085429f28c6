"""`CodistillTrainerMixin`: the places where a `Trainer` assumes the world is one data-parallel group.

Put first in the bases of a Trainer class (`CodistillTrainer` in hf_trainer.py is
`CodistillTrainerMixin + Trainer`). Each change, and why:

    engines shard over the world        -> built inside `group_sharding.engines_in_group`
    loaders shard over the world        -> group g's rows, split over its S ranks
    batch = micro x accum x world       -> x S (`get_total_train_batch_size`, DeepSpeed config)
    tokens averaged over the world      -> over the group (`_get_num_items_in_batch`, loss scale)
    "loss" logged as the world's mean   -> the group's mean, plus distill_loss, alpha, agreement
                                           (no world-wide gather at logging steps; flos per group)
    global rank 0 reports               -> each group's leader reports (`report_to` as usual)
    global rank 0 saves                 -> each group's leader saves into output_dir/group{g}
                                           (model, tokenizer, state, metrics, checkpoints;
                                           ZeRO-3 weights consolidated in-group: hf_outputs.py)
    train_samples = the whole dataset   -> the group's shard (`log_metrics`, `save_metrics`)
    resume_from_checkpoint: one path    -> my group's checkpoint-N, with the exchange state
    eval metrics gathered over world    -> gathered inside the group
    a NaN loss or a dead peer           -> one line and exit 4 or 3, as in the CLI (hf_health.py)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from codistill_ds.backends.materialize import check_initialized
from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology
from codistill_ds.integrations.group_sharding import (
    engines_in_group,
    gather_in_group,
    group_shard,
    reshard_loader,
)
from codistill_ds.integrations.hf_trainer.callback import (
    CodistillCallback,
    use_gloo_for_cpu_deepspeed,
)
from codistill_ds.integrations.hf_trainer.outputs import (
    group_checkpoint,
    group_leader_saves,
    group_state_dict,
    save_on_any_rank,
    write_latest_tag,
)


def attach_callback(codistill: Any, args: tuple, kwargs: dict) -> None:
    """Put the codistillation callback into the Trainer's `callbacks=`: the one `codistill_init`
    returned, or one built from `CodistillArguments`/`CodistillConfig` (then the model was built
    without the group's seed, which only `same_init` allows)."""
    if codistill is None:
        return
    if not isinstance(codistill, CodistillCallback):
        codistill = CodistillCallback.from_arguments(codistill)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            use_gloo_for_cpu_deepspeed(training_args)
        if not codistill.config.same_init:
            raise ValueError("the model was built before codistillation was set up, so every group would start "
                             "from the same weights: call `codistill = codistill_init(codistill_args, "
                             "training_args)` before building the model and pass codistill=codistill, or set "
                             "--codistill_same_init")
    codistill.end_model_init()
    callbacks = list(kwargs.get("callbacks") or [])
    if codistill not in callbacks:
        callbacks.append(codistill)
    kwargs["callbacks"] = callbacks


def refuse_trainer_model_parallelism(args: Any, model: Any = None) -> None:
    """One line, before Accelerate builds anything, when the TrainingArguments or the model ask
    for TP/CP/SP or HSDP (integrations/model_parallel.py: Accelerate's mesh spans the world)."""
    if args is None:
        return
    from codistill_ds.integrations.model_parallel import refuse_model_parallelism

    refuse_model_parallelism("the Hugging Face Trainer integration",
                             parallelism_config=getattr(args, "parallelism_config", None),
                             ds_config=getattr(args, "hf_deepspeed_config", None) or getattr(args, "deepspeed", None),
                             model=model, fsdp=getattr(args, "fsdp", None))


def _find_callback(callbacks: list) -> CodistillCallback:
    found = [cb for cb in callbacks if isinstance(cb, CodistillCallback)]
    if len(found) != 1:
        raise ValueError(f"a codistilling Trainer needs exactly one CodistillCallback (codistill=... or in "
                         f"callbacks=[...]), found {len(found)}")
    return found[0]


class CodistillTrainerMixin:
    """Put first in the bases of a `Trainer` (sub)class; see the module docstring for each change."""

    def __init__(self, *args: Any, codistill: Any = None, **kwargs: Any) -> None:
        refuse_trainer_model_parallelism(kwargs.get("args", args[1] if len(args) > 1 else None),
                                         kwargs.get("model", args[0] if args else None))
        attach_callback(codistill, args, kwargs)
        super().__init__(*args, **kwargs)
        self.codistill = _find_callback(self.callback_handler.callbacks)
        self.codistill.end_model_init()
        if self.model is not None:  # every rank of every group: no group may start from NaN
            check_initialized(self.model)
        self._check_engine()
        full = self.train_dataset
        run_dir = self.args.output_dir
        self.codistill.setup(self, full, run_dir)
        t = self.codistill.topology
        self._cd_full_rows = len(full) if hasattr(full, "__len__") else None
        if full is not None:
            self.train_dataset = group_shard(full, t.group_id, t.groups)
        if os.path.basename(os.path.normpath(run_dir)) != f"group{t.group_id}":
            self.args.output_dir = os.path.join(run_dir, f"group{t.group_id}")
        group_leader_saves(self.args, t.dims)
        if t.is_leader:  # save_metrics/save_state may come before any save_model
            os.makedirs(self.args.output_dir, exist_ok=True)
        self._fsdp_mesh = None
        if self.is_fsdp_enabled:
            self._fsdp_mesh = t.shard_mesh("cuda" if torch.cuda.is_available() else "cpu")
        self._cd_window, self._cd_total, self._cd_logged_step, self._cd_patched = None, 0.0, 0, False

    def _check_engine(self) -> None:
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("codistillation shards each replica with DeepSpeed (TrainingArguments(deepspeed=...)"
                             " under the deepspeed launcher) or FSDP2 (accelerator devices only: Accelerate 1.15"
                             " keeps FSDP off for CPU processes); plain DDP would all-reduce gradients over the"
                             " whole world, which is synchronous training")
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError("codistillation shards on an FSDP2 mesh: set fsdp_config={'fsdp_version': 2}")

    @property
    def _topology(self) -> Topology:
        return self.codistill.topology

    @property
    def gather_function(self):
        """Eval losses/logits gathered inside my group; the Trainer re-assigns it after every eval
        loop (to `gather_for_metrics`, a world gather), so the assignment is kept aside instead."""
        cd = getattr(self, "codistill", None)
        if cd is None or cd.topology is None:
            return self._cd_world_gather
        return lambda data: gather_in_group(data, cd.topology, self.accelerator.gradient_state)

    @gather_function.setter
    def gather_function(self, fn) -> None:
        self._cd_world_gather = fn

    # ---- engines built inside the group ---------------------------------------------------
    @contextmanager
    def _engines_in_group(self) -> Iterator[None]:
        if self._cd_patched:  # evaluate() inside train()
            yield
            return
        self._cd_patched = True
        try:
            with engines_in_group(self._topology, self.is_deepspeed_enabled, self._fsdp_mesh), self._logging_in_group():
                yield
        finally:
            self._cd_patched = False

    @contextmanager
    def _logging_in_group(self) -> Iterator[None]:
        """The Trainer all-gathers the training loss over the world at every logging step (a
        world-wide collective whose mean `log` replaces by the group's anyway): gather in-group."""
        import transformers.trainer as trainer_module

        saved = trainer_module.nested_gather
        trainer_module.nested_gather = lambda tensors, *args, **kwargs: gather_in_group(tensors, self._topology)
        try:
            yield
        finally:
            trainer_module.nested_gather = saved

    def store_flos(self) -> None:
        """Floating-point operations of my group's replica (the Trainer sums the world's)."""
        flos = torch.tensor([float(self.current_flos)], dtype=torch.float64)
        comm.all_reduce(flos, group=self._topology.group)
        self.state.total_flos += flos.item()
        self.current_flos = 0

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        """`resume_from_checkpoint` (one value for every rank: True, `output_dir/checkpoint-N`, or
        any group's `checkpoint-N`) resumes my group from its own checkpoint-N, exchange state too."""
        resume = self._group_resume(resume_from_checkpoint)
        with self._engines_in_group(), self.codistill.guard.training():
            return super().train(resume, *args, **kwargs)

    def _group_resume(self, resume: Any) -> Any:
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if resume is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} (this group's output folder)")
        resume = group_checkpoint(resume, self._topology.group_id)
        if isinstance(resume, (str, os.PathLike)):
            self.codistill.load_state(os.fspath(resume))
        return resume

    def evaluate(self, *args: Any, **kwargs: Any):
        with self._engines_in_group(), self.codistill.guard.slow("evaluation"):
            return super().evaluate(*args, **kwargs)

    # ---- per-group outputs (hf_outputs.py) ------------------------------------------------
    def _zero3_gathers_on_save(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        zero = (plugin.deepspeed_config.get("zero_optimization") or {}) if plugin is not None else {}
        return zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") in (True, "true")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3, my group's weights consolidated on its leader (DeepSpeed's own routine
        copies them on global rank 0 only); otherwise the Trainer's own save, per group leader."""
        if not self._zero3_gathers_on_save():
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = group_state_dict(self.model, self._topology.is_leader)
        self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`save_pretrained` on my group's leader (transformers writes on global rank 0 only)."""
        with save_on_any_rank(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            return super()._save(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DeepSpeed writes the `latest` tag of a checkpoint on global rank 0 only."""
        super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        if self.is_deepspeed_enabled and self.args.should_save and self._topology.rank != 0:
            write_latest_tag(output_dir, f"global_step{engine.global_steps}")
            if engine.zero_optimization():
                engine._copy_recovery_script(output_dir)  # zero_to_fp32.py, as group 0 has

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = self.state.global_step
        with self.codistill.guard.slow(f"saving {PREFIX_CHECKPOINT_DIR}-{step}"):
            super()._save_checkpoint(model, trial)
            self.codistill.save_state(os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{step}"))

    def _group_metrics(self, split: str, metrics: dict) -> dict:
        """`train_samples` as scripts compute it (len of the dataset handed to the Trainer)
        becomes my group's shard: each group trained on 1/K of it."""
        if split == "train" and self._cd_full_rows is not None and metrics.get("train_samples") == self._cd_full_rows:
            return {**metrics, "train_samples": len(self.train_dataset)}
        return metrics

    def log_metrics(self, split: str, metrics: dict) -> None:
        return super().log_metrics(split, self._group_metrics(split, metrics))

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        return super().save_metrics(split, self._group_metrics(split, metrics), combined)

    # ---- data and batch bookkeeping -------------------------------------------------------
    def get_train_dataloader(self):
        return reshard_loader(super().get_train_dataloader(), self._topology)

    def get_eval_dataloader(self, eval_dataset=None):
        return reshard_loader(super().get_eval_dataloader(eval_dataset), self._topology)

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self._topology.data_size

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Token count summed over my group, not the world (the world mixes other groups' batches)."""
        if not self.args.average_tokens_across_devices:
            return super()._get_num_items_in_batch(batch_samples, device)
        self.args.average_tokens_across_devices = False  # count locally, then reduce in the group
        try:
            n = super()._get_num_items_in_batch(batch_samples, device)
        finally:
            self.args.average_tokens_across_devices = True
        if torch.is_tensor(n):
            comm.all_reduce(n, group=self._topology.group)
        return n

    def _world_scaled(self, num_items_in_batch: Any) -> bool:
        """Mirrors Trainer.compute_loss: it multiplies by the number of processes in this case."""
        return bool(self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
                    and num_items_in_batch is not None)

    def _trainer_divides_by_accumulation(self, num_items_in_batch: Any) -> bool:
        """Mirrors Trainer.training_step's loss_is_scaled_for_ga rule."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return not scaled

    # ---- the loss -------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self._world_scaled(num_items_in_batch):  # sum / group tokens x S: the group's mean after averaging
            loss = loss * (self._topology.data_size / self.accelerator.num_processes)
        if model.training:
            term = self.codistill.distill_term(model)
            if term is not None:
                # Added once per optimizer step (first micro-batch), so undo the Trainer's 1/accumulation.
                scale = self.current_gradient_accumulation_steps if self._trainer_divides_by_accumulation(num_items_in_batch) else 1
                loss = loss + scale * term
        return (loss, outputs) if return_outputs else loss

    # ---- logging --------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.codistill.record_loss(loss)
        self._cd_window = loss.detach() if self._cd_window is None else self._cd_window + loss.detach()
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The group's own training loss (the Trainer logs the world's mean), plus codistillation figures."""
        t = self._topology
        if "loss" in logs and self._cd_window is not None:
            # In the window's own dtype, like the Trainer's gathered mean: a plain run logs the same bits.
            window = self._cd_window.detach().reshape(1).clone()
            comm.all_reduce(window, group=t.group)
            group_sum = (window / t.group_size).item()
            self._cd_total += group_sum
            since = max(self._cd_logged_step, self.codistill.start_step)
            logs["loss"] = group_sum / max(self.state.global_step - since, 1)
            self._cd_window, self._cd_logged_step = None, self.state.global_step
            if self.codistill.engine is not None:  # what the peers' guard sees of this group
                self.codistill.engine.note_loss(self.state.global_step, logs["loss"])
            logs.update(self.codistill.log_metrics())
        if "train_loss" in logs:  # end of train(): the Trainer's mean over all its steps, per group
            if self._cd_window is not None:  # steps after the last logging step
                window = self._cd_window.detach().reshape(1).clone()
                comm.all_reduce(window, group=t.group)
                self._cd_total += (window / t.group_size).item()
                self._cd_window = None
            logs["train_loss"] = self._cd_total / max(self.state.global_step - self.codistill.start_step, 1)
        logs.setdefault("group", t.group_id)
        super().log(logs, *args, **kwargs)

    def is_local_process_zero(self) -> bool:
        """Each group's leader also prints its group's logs (PrinterCallback prints where this holds)."""
        cd = getattr(self, "codistill", None)
        leader = cd is not None and cd.topology is not None and cd.topology.is_leader
        return leader or super().is_local_process_zero()

    def is_world_process_zero(self) -> bool:
        """Each group's leader reports its group (progress, report_to), like rank 0 of a plain job."""
        cd = getattr(self, "codistill", None)
        if cd is None or cd.topology is None:
            return super().is_world_process_zero()
        return cd.topology.is_leader

"""Codistillation in a Hugging Face `Trainer` script: ZeRO or FSDP2 inside each group, logits across.

The lines a user adds to an existing Trainer script (launched with `deepspeed --num_gpus N` and
`TrainingArguments(deepspeed=...)`, or with FSDP2 through `fsdp_config={"fsdp_version": 2}`):

    from codistill_ds.config import CodistillConfig
    from codistill_ds.integrations.hf_trainer import CodistillCallback, CodistillTrainerMixin

    class MyTrainer(CodistillTrainerMixin, Trainer):    # mixin first; any Trainer subclass works
        pass

    codistill = CodistillCallback(CodistillConfig(groups=2, alpha=1.0, burn_in=100, interval=1))
    set_seed(codistill.group_seed(args.seed))            # each group draws its own initialization
    model = LlamaForCausalLM(config)                     # ZeRO-3 from_pretrained/from_config after
                                                         # TrainingArguments: `with codistill.zero3_init():`
    trainer = MyTrainer(model=model, args=args, train_dataset=train, callbacks=[codistill])
    trainer.train()

The world splits into K contiguous groups (`topology.py`); each trains one replica on its own
shard of `train_dataset` (rows g, g+K, ...). Every `interval` steps all groups predict, in eval
mode, on the same exchange batch (drawn from the full train set, or `exchange_dataset`), swap
compressed predictions and add alpha(t) * 1/(K-1) * sum_j D(f_j || f_i) on that batch to their
loss (Anil et al. 2018, arXiv 1804.03235). The schedule (interval, staleness with asynchronous
swaps, NaN peers skipped, agreement, bytes) is the exchange engine's (`engine.py`), the same
object the CLI loop drives. A callback cannot change the loss, so the work is split:
`CodistillCallback` owns the engine and drives it at step begin; `CodistillTrainerMixin` adds the term in `compute_loss` and
changes each place where the Trainer assumes the whole world is one data-parallel group:

    engines shard over the world        -> built inside `group_sharding.engines_in_group`
    loaders shard over the world        -> group g's rows, split over its S ranks
    batch = micro x accum x world       -> x S (`get_total_train_batch_size`, DeepSpeed config)
    tokens averaged over the world      -> over the group (`_get_num_items_in_batch`, loss scale)
    "loss" logged as the world's mean   -> the group's mean, plus distill_loss, alpha, agreement
    global rank 0 reports               -> each group's leader reports (`report_to` as usual),
                                           args.output_dir becomes output_dir/group{g}
    eval metrics gathered over world    -> gathered inside the group

DeepSpeed configs follow the Trainer's rule: batch keys "auto" (the engine then gets the group's
train_batch_size). FSDP2 through the Trainer needs accelerator devices: Accelerate 1.15 never
enables FSDP for CPU processes (the hook itself is tested on CPU, tests/test_hf_trainer.py).
Its `cpu_ram_efficient_loading` broadcasts global rank 0's weights over the world, so every
group would start from group 0's initialization.

Not handled: saving a Hugging Face model folder per group (DeepSpeed consolidates ZeRO-3 weights
on global rank 0 only, and the Trainer writes only where `args.should_save`); plain DDP (it
all-reduces over the whole world: synchronous training); tensor/sequence parallelism.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .. import comm
from ..config import CodistillConfig, Config, ConfigError
from ..data import EXCHANGE_STREAM_TAG, _EpochPermutation
from ..dist import env_rank, env_world_size
from ..engine import (
    ExchangeBatch,
    ExchangeEngine,
    ExchangeSettings,
    TargetBatch,
    Transport,
)
from ..schedules import alpha_at
from ..topology import Layout, Topology, build_topology
from ..validation import check_choices, check_numbers, check_topology
from .group_sharding import (
    engines_in_group,
    gather_in_group,
    group_shard,
    reshard_loader,
    zero3_init_in_group,
)

MODEL_INPUTS = ("input_ids", "attention_mask")
"""Columns of an exchange example fed to the model; labels are not needed to predict."""


def validate_for_trainer(cfg: CodistillConfig, world_size: int) -> None:
    """The library's checks of the codistill section, plus what the Trainer path cannot do."""
    full = Config(codistill=cfg)
    check_topology(full, world_size)
    check_choices(full)
    check_numbers(full)
    if not cfg.enabled:
        raise ConfigError("codistill.enabled", "the Trainer integration always codistills; for a plain "
                          "run leave out CodistillCallback and CodistillTrainerMixin")
    if cfg.exchange_batch != "shared":
        raise ConfigError("codistill.exchange_batch", "the Trainer integration supports 'shared' only: "
                          "a group cannot know its peers' Trainer batches")


class ExchangeBatches:
    """Exchange batch e: the same rows on every group (seeded order), rank r's 1/S slice of them."""

    def __init__(self, dataset: Any, seed: int, batch: int, topology: Topology, collate: Any,
                 device: torch.device, ignore_index: int = -100) -> None:
        if batch % topology.group_size:
            raise ConfigError("exchange_batch_size", f"{batch} is not divisible by the "
                              f"{topology.group_size} ranks per group")
        self.dataset, self.collate, self.device, self.ignore_index = dataset, collate, device, ignore_index
        self.order = _EpochPermutation(len(dataset), seed + EXCHANGE_STREAM_TAG)
        self.batch, self.slice, self.rank = batch, batch // topology.group_size, topology.group_rank

    def __call__(self, step: int, e: int) -> ExchangeBatch:
        start = e * self.batch + self.rank * self.slice
        rows = [self.dataset[int(i)] for i in self.order(np.arange(start, start + self.slice))]
        keys = [k for k in (*MODEL_INPUTS, "labels") if k in rows[0]]
        batch = self.collate([{k: row[k] for k in keys} for row in rows])
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in MODEL_INPUTS}
        return ExchangeBatch(inputs, distill_mask(inputs, batch.get("labels"), self.ignore_index),
                             range(self.rank * self.slice, (self.rank + 1) * self.slice))


def distill_mask(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                 ignore_index: int) -> torch.Tensor | None:
    """Positions whose prediction is distilled: attended, and not predicting an ignored label.

    The logits at position t predict token t+1, so a label of `ignore_index` at t+1 (padding, a
    prompt) masks position t, as it masks that token's cross-entropy; the last position has no
    next label and is kept when attended."""
    mask = inputs.get("attention_mask")
    mask = None if mask is None else mask.bool()
    if labels is not None:
        labels = labels.to(inputs["input_ids"].device)
        keep = torch.ones_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != ignore_index
        mask = keep if mask is None else mask & keep
    return None if mask is None else mask.flatten()


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return logits.flatten(0, 1)


class CodistillCallback(TrainerCallback):
    """Codistillation state for one rank: topology, the exchange engine, the alpha schedule."""

    def __init__(self, config: CodistillConfig | None = None, exchange_dataset: Any = None,
                 exchange_batch_size: int | None = None, transport: Transport | None = None) -> None:
        self.config = config or CodistillConfig()
        validate_for_trainer(self.config, env_world_size())  # before any collective can hang
        self.layout = Layout(env_world_size(), self.config.groups, env_rank())
        self.exchange_dataset, self.exchange_batch_size = exchange_dataset, exchange_batch_size
        self.topology: Topology | None = None
        self.engine: ExchangeEngine | None = None
        self._transport = transport
        self.due: list[TargetBatch] = []
        self.alpha = 0.0
        self.distill_value: torch.Tensor | None = None
        self.agreement: float | None = None
        """Of the latest completed exchange: logged at every logging step, like distill_loss."""

    def group_seed(self, seed: int) -> int:
        """Seed for building this group's replica: its own init unless `same_init` (no collective)."""
        return seed + (0 if self.config.same_init else self.layout.group_id)

    def build_topology(self) -> Topology:
        """Create the process groups once (a collective over the whole world)."""
        if self.topology is None:
            if not dist.is_initialized():
                raise RuntimeError("create TrainingArguments first: it initializes torch.distributed")
            self.topology = build_topology(self.config.groups)
        return self.topology

    @contextmanager
    def zero3_init(self) -> Iterator[None]:
        """Wrap `from_pretrained`/`from_config` under a ZeRO-3 TrainingArguments: partition in-group."""
        with zero3_init_in_group(self.build_topology()):
            yield

    def setup(self, trainer: Any, train_dataset: Any) -> None:
        """Called by the mixin: the exchange stream draws from the full (unsharded) train set."""
        from ..exchange import LogitExchange

        t = self.build_topology()
        self.trainer, self.device = trainer, trainer.args.device
        dataset = self.exchange_dataset if self.exchange_dataset is not None else train_dataset
        batch = self.exchange_batch_size or trainer.args.per_device_train_batch_size * t.group_size
        batches = ExchangeBatches(dataset, trainer.args.seed, batch, t, trainer.data_collator, self.device,
                                  self.config.ignore_index)
        transport = self._transport or LogitExchange(t, self.config.route)
        self.engine = ExchangeEngine(transport, ExchangeSettings.from_config(self.config, trainer.args.seed), t.group, t.group_id,
                                     batches, leader=t.layout.is_leader)

    # ---- hooks ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.engine is None:  # a callback alone cannot add a loss term or shard in-group
            raise RuntimeError("CodistillCallback needs a Trainer with CodistillTrainerMixin first in its "
                               "bases: class MyTrainer(CodistillTrainerMixin, Trainer)")

    def on_step_begin(self, args, state, control, **kwargs):
        cd, step = self.config, state.global_step
        self.alpha = alpha_at(step, cd.alpha, cd.burn_in, cd.ramp)
        self.due = self.engine.step(step, self._predict)
        stats = self.engine.stats
        if stats.distill_eval is not None:  # logged during burn-in too, like the CLI loop
            self.distill_value = torch.tensor(stats.distill_eval)
        if stats.agreement is not None:
            self.agreement = stats.agreement

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.close()

    def _predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher side: eval mode (no dropout), no graph; the engine compresses and swaps."""
        model = self.trainer.model_wrapped
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return _logits(model(**inputs))
        finally:
            model.train(was_training)

    def distill_term(self, model: torch.nn.Module) -> torch.Tensor | None:
        """alpha * D(peers || me) on the due exchange batches, in train mode; once per optimizer step."""
        batches, self.due = self.due, []
        if not batches or self.alpha == 0:
            return None
        students = [_logits(model(**b.inputs)) for b in batches]
        d = self.engine.distill_loss(students, batches)
        self.distill_value = d.detach()
        return self.alpha * d

    def log_metrics(self) -> dict[str, float]:
        """Group-level figures for the Trainer's logs; a collective over my group (every rank calls it)."""
        t, stats = self.topology, self.engine.stats
        out = {"alpha": self.alpha, "group": t.group_id, "cross_group_bytes": self.engine.bytes_sent,
               "exchange_ms": stats.exchange_ms, "exchange_compute_ms": stats.exchange_compute_ms,
               "skipped_peers": self.engine.skipped_peers}
        if stats.peers is not None:
            out["peers"] = stats.peers
        if self.distill_value is not None:
            v = self.distill_value.detach().double().reshape(1).cpu()
            comm.all_reduce(v, group=t.group)
            out["distill_loss"] = (v / t.group_size).item()
        if self.agreement is not None:
            out["agreement"] = self.agreement
        return out


def _find_callback(callbacks: list) -> CodistillCallback:
    found = [cb for cb in callbacks if isinstance(cb, CodistillCallback)]
    if len(found) != 1:
        raise ValueError(f"CodistillTrainerMixin needs exactly one CodistillCallback in callbacks=[...], "
                         f"found {len(found)}")
    return found[0]


class CodistillTrainerMixin:
    """Put first in the bases of a `Trainer` (sub)class; see the module docstring for each change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codistill = _find_callback(self.callback_handler.callbacks)
        self._check_engine()
        full = self.train_dataset
        self.codistill.setup(self, full)
        t = self.codistill.topology
        if full is not None:
            self.train_dataset = group_shard(full, t.group_id, t.groups)
        self.args.output_dir = os.path.join(self.args.output_dir, f"group{t.group_id}")
        self._fsdp_mesh = None
        if self.is_fsdp_enabled:
            from ..backends.fsdp_backend import codistill_mesh

            self._fsdp_mesh = codistill_mesh(t, "cuda" if torch.cuda.is_available() else "cpu")["shard"]
        self._cd_window, self._cd_total, self._cd_logged_step, self._cd_patched = None, 0.0, 0, False

    def _check_engine(self) -> None:
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("codistillation shards each replica with DeepSpeed (TrainingArguments(deepspeed=...)"
                             " under the deepspeed launcher) or FSDP2; plain DDP would all-reduce gradients over"
                             " the whole world, which is synchronous training")
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
            with engines_in_group(self._topology, self.is_deepspeed_enabled, self._fsdp_mesh):
                yield
        finally:
            self._cd_patched = False

    def train(self, *args: Any, **kwargs: Any):
        with self._engines_in_group():
            return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any):
        with self._engines_in_group():
            return super().evaluate(*args, **kwargs)

    # ---- data and batch bookkeeping -------------------------------------------------------
    def get_train_dataloader(self):
        return reshard_loader(super().get_train_dataloader(), self._topology)

    def get_eval_dataloader(self, eval_dataset=None):
        return reshard_loader(super().get_eval_dataloader(eval_dataset), self._topology)

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self._topology.group_size

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
            loss = loss * (self._topology.group_size / self.accelerator.num_processes)
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
            logs["loss"] = group_sum / max(self.state.global_step - self._cd_logged_step, 1)
            self._cd_window, self._cd_logged_step = None, self.state.global_step
            logs.update(self.codistill.log_metrics())
        if "train_loss" in logs:  # end of train(): the Trainer's mean over all its steps, per group
            if self._cd_window is not None:  # steps after the last logging step
                window = self._cd_window.detach().reshape(1).clone()
                comm.all_reduce(window, group=t.group)
                self._cd_total += (window / t.group_size).item()
                self._cd_window = None
            logs["train_loss"] = self._cd_total / max(self.state.global_step, 1)
        logs.setdefault("group", t.group_id)
        super().log(logs, *args, **kwargs)

    def is_world_process_zero(self) -> bool:
        """Each group's leader reports its group (progress, report_to), like rank 0 of a plain job."""
        cd = getattr(self, "codistill", None)
        if cd is None or cd.topology is None:
            return super().is_world_process_zero()
        return cd.topology.layout.is_leader

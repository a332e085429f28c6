"""`CodistillCallback`: one rank's codistillation state on the Hugging Face Trainer path.

It owns the topology (the process groups), the exchange engine (`engine.py`, the same object
the CLI loop drives: interval, staleness with asynchronous swaps, NaN peers skipped, agreement,
bytes), the alpha schedule and the failure guard (`hf_health.py`). Built before the model by
`codistill_init` (hf_trainer.py), so that the model is constructed with the group's seed and,
under ZeRO-3, partitioned inside the group; `CodistillTrainerMixin` (hf_mixin.py) then drives it.

Every `interval` steps all groups predict, in eval mode, on the same exchange batch (drawn from
the full train set, or `exchange_dataset`), swap compressed predictions and add
alpha(t) * 1/(K-1) * sum_j D(f_j || f_i) on that batch to their loss (Anil et al. 2018,
arXiv 1804.03235). A callback cannot change the loss: the mixin adds `distill_term` in
`compute_loss`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, set_seed

from codistill_ds.config import CodistillConfig, ConfigError
from codistill_ds.distributed.env import env_rank, env_world_size, release_deepspeed_shm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange import setup
from codistill_ds.exchange.batches import TargetBatch
from codistill_ds.exchange.distiller import Distiller
from codistill_ds.exchange.engine import ExchangeEngine
from codistill_ds.exchange.transport.base import Transport
from codistill_ds.integrations.exchange_data import (
    check_same_exchange_data,
    engine_for_dataset,
    integration_metrics,
    model_vocab_size,
    predict_logits,
    student_term,
    topology_for,
    validate_integration,
)
from codistill_ds.integrations.group_sharding import zero3_init_in_group
from codistill_ds.integrations.hf_trainer.health import TrainerGuard


def validate_for_trainer(cfg: CodistillConfig, world_size: int) -> None:
    """The library's checks of the codistill section, plus what the Trainer path cannot do."""
    validate_integration(cfg, world_size, "the Trainer integration",
                         "leave out CodistillCallback and CodistillTrainerMixin")


def use_gloo_for_cpu_deepspeed(args: Any) -> None:
    """Let `deepspeed --num_gpus N` run a Trainer script on a machine without accelerators.

    Accelerate 1.15 finds no device type there, so it picks no backend for a DeepSpeed run
    (`PartialState._prepare_backend`) and reports a world of one process; TrainingArguments then
    fills the "auto" train_batch_size for one process and DeepSpeed's batch check fails. The
    process group itself exists (DeepSpeed created it with gloo), so Accelerate's state is
    rebuilt on top of it with backend "gloo" (what a user would otherwise do by hand before
    TrainingArguments: `PartialState(backend="gloo")` plus `accelerator_config={"use_configured_state":
    True}`), and TrainingArguments' DeepSpeed step runs again from the untouched `args.deepspeed`.
    A no-op with CUDA, without DeepSpeed, or when Accelerate already counts every process."""
    if torch.cuda.is_available() or getattr(args, "deepspeed_plugin", None) is None or not dist.is_initialized():
        return
    state = args.distributed_state
    if state is not None and state.num_processes == dist.get_world_size():
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it builds the state
    try:
        args.distributed_state = PartialState(backend="gloo", timeout=datetime.timedelta(seconds=args.ddp_timeout))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    if args.deepspeed:  # TrainingArguments.__post_init__, step "DeepSpeed (must be last)", with the right world
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
        args.hf_deepspeed_config.trainer_config_process(args)
        args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


class CodistillCallback(TrainerCallback):
    """Codistillation state for one rank: topology, the exchange engine, the alpha schedule."""

    def __init__(self, config: CodistillConfig | None = None, exchange_dataset: Any = None,
                 exchange_batch_size: int | None = None, transport: Transport | None = None,
                 peer_timeout_s: float = 180.0) -> None:
        self.config = config or CodistillConfig()
        validate_for_trainer(self.config, env_world_size())  # before any collective can hang
        if peer_timeout_s <= 0:
            raise ConfigError("codistill_peer_timeout_s", f"must be > 0 seconds, got {peer_timeout_s}")
        setup.check_lighthouse(self.config)
        self.dims = setup.parallel_dims(self.config, env_world_size(), env_rank())
        self.exchange_dataset, self.exchange_batch_size = exchange_dataset, exchange_batch_size
        self.peer_timeout_s = peer_timeout_s
        self.topology: Topology | None = None
        self.engine: ExchangeEngine | None = None
        self.guard: TrainerGuard | None = None
        self._transport = transport
        self._model_init = ExitStack()
        self.model_init_done = False
        """True once `begin_model_init` seeded this group (the model is built after it)."""
        self.distiller: Distiller | None = None
        """alpha(t), each step's exchange and distillation term, the logged figures (with the engine)."""
        self.due: list[TargetBatch] = []
        self.start_step = 0
        self._step_loss: torch.Tensor | None = None

    @classmethod
    def from_arguments(cls, arguments: Any, **kwargs: Any) -> CodistillCallback:
        """From the `CodistillArguments` of `HfArgumentParser` (or a `CodistillConfig`)."""
        if isinstance(arguments, CodistillConfig):
            return cls(arguments, **kwargs)
        return cls(arguments.to_config(), exchange_batch_size=arguments.codistill_exchange_batch_size,
                   peer_timeout_s=arguments.codistill_peer_timeout_s, **kwargs)

    def group_seed(self, seed: int) -> int:
        """Seed for building this group's replica: its own init unless `same_init` (no collective)."""
        return setup.group_seed(seed, self.config, self.dims.group_id)

    def build_topology(self) -> Topology:
        """Create the process groups once (a collective over the whole world)."""
        if self.topology is None:
            self.topology = topology_for(self.config, self.dims)
        return self.topology

    @contextmanager
    def zero3_init(self) -> Iterator[None]:
        """Wrap `from_pretrained`/`from_config` under a ZeRO-3 TrainingArguments: partition in-group."""
        with zero3_init_in_group(self.build_topology()):
            yield

    # ---- before the model: codistill_init -------------------------------------------------
    def begin_model_init(self, args: Any) -> None:
        """Everything the model's construction must see, from here until the Trainer is built:
        Accelerate's CPU state fixed, process groups, this group's seed, and under ZeRO-3 the
        in-group `deepspeed.zero.Init` that `from_config`/`from_pretrained` enter."""
        use_gloo_for_cpu_deepspeed(args)
        release_deepspeed_shm()
        topology = self.build_topology()
        set_seed(self.group_seed(args.seed))
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            self._model_init.enter_context(zero3_init_in_group(topology))
        self.model_init_done = True

    def end_model_init(self) -> None:
        """The model exists (the Trainer is being built): restore `deepspeed.zero.Init`."""
        self._model_init.close()

    def setup(self, trainer: Any, train_dataset: Any, run_dir: str) -> None:
        """Called by the mixin: the exchange stream draws from the full (unsharded) train set;
        heartbeats and failure notes go under `run_dir/health`."""
        from transformers.trainer_utils import get_last_checkpoint

        t = self.build_topology()
        self.trainer, self.device = trainer, trainer.args.device
        dataset = self.exchange_dataset if self.exchange_dataset is not None else train_dataset
        if dataset is None:
            raise ValueError("codistillation needs a train_dataset (or exchange_dataset) to draw exchange batches from")
        digest = check_same_exchange_data(dataset, t.dims)
        batch = self.exchange_batch_size or trainer.args.per_device_train_batch_size * t.data_size
        self.engine = engine_for_dataset(self.config, t, dataset=dataset, digest=digest, seed=trainer.args.seed,
                                         batch=batch, collate=trainer.data_collator, device=self.device,
                                         vocab_size=lambda: model_vocab_size(trainer.model),
                                         transport=self._transport)
        self.distiller = Distiller(self.config, self.engine, trainer.args.seed)
        self.guard = TrainerGuard(run_dir, t.dims, self.peer_timeout_s, trainer.args.ddp_timeout,
                                  lambda: _last_checkpoint(trainer.args.output_dir, get_last_checkpoint))

    # ---- checkpoints ----------------------------------------------------------------------
    def state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, f"codistill_rank{self.dims.rank}.pt")

    def save_state(self, checkpoint_dir: str) -> None:
        """The engine's queued peer targets (staleness > 0), byte and skipped-peer counts."""
        torch.save(self.engine.state_dict(), self.state_path(checkpoint_dir))

    def load_state(self, checkpoint_dir: str) -> bool:
        path = self.state_path(checkpoint_dir)
        if not os.path.isfile(path):
            return False
        self.engine.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        return True

    # ---- hooks ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.engine is None:  # a callback alone cannot add a loss term or shard in-group
            raise RuntimeError("CodistillCallback needs a Trainer with CodistillTrainerMixin first in its "
                               "bases: use CodistillTrainer, or class MyTrainer(CodistillTrainerMixin, Trainer)")
        self.start_step = state.global_step  # after a resume: the checkpoint's step
        setup.join_groups(self.engine.transport, self.config, self.topology)  # separate group jobs wait for each other
        self.guard.started(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.due = self.distiller.begin(state.global_step, self._predict)

    def record_loss(self, loss: torch.Tensor) -> None:
        """Each micro-step's training loss (the mixin's training_step), summed over the step."""
        loss = loss.detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def on_step_end(self, args, state, control, **kwargs):
        """After the optimizer step, before the next exchange: a group whose loss is NaN/Inf on
        any of its ranks stops here and never sends predictions from the diverged weights."""
        loss, self._step_loss = self._step_loss, None
        if loss is not None:
            self.guard.step_done(float(loss), self.topology.group, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.close()  # the last posted swaps finish (a later train() restarts the worker)

    def _predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher side: eval mode (no dropout), no graph; the engine compresses and swaps."""
        return predict_logits(self.trainer.model_wrapped, inputs)

    def distill_term(self, model: torch.nn.Module) -> torch.Tensor | None:
        """alpha * D(peers || me) on the due exchange batches, in train mode; once per optimizer step."""
        batches, self.due = self.due, []
        return student_term(self.distiller, model, batches)

    def log_metrics(self) -> dict[str, float]:
        """Group-level figures for the Trainer's logs; a collective over my group (every rank calls it)."""
        return integration_metrics(self.distiller, self.topology)


def _last_checkpoint(output_dir: str, find) -> str | None:
    return find(output_dir) if os.path.isdir(output_dir) else None

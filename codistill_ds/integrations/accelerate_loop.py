"""Codistillation in your own Accelerate training loop: `Codistill`.

A loop of your own, written with `Accelerator.prepare` and `accelerator.backward` (not the
project's CLI, not the Hugging Face Trainer), codistills with eight lines added or changed:
two imports, these five, and one to print the metrics on `is_leader` (README, "Your own
Accelerate loop", has the diff against a plain loop; examples/accelerate_loop.py runs it):

    codistill = Codistill.from_accelerator(accelerator, CodistillConfig(groups=2), exchange_dataset=rows, seed=SEED)
    loader = DataLoader(codistill.shard(rows), batch_size=8, shuffle=True)
    model, optimizer, loader = codistill.prepare(model, optimizer, loader)
        loss = codistill.distill(loss, model, step)        # after the forward, before accelerator.backward
        metrics = codistill.log_metrics()                  # where the loop logs (every rank calls it)

Optional: `codistill.checkpoint_activations(model, "full")` (or "selective") recomputes each
transformer block's activations in backward instead of keeping them. Tensor parallelism, HSDP
and context/sequence parallelism are refused with one line (integrations/model_parallel.py:
Accelerate's `ParallelismConfig` mesh spans the whole world); the CLI's `parallel.tp` does TP.

The world splits into K contiguous groups (`topology.py`); each trains one replica, sharded
inside the group only, on its own rows, and every `interval` steps all groups predict on the same
exchange batch, swap compressed predictions and add alpha(t) * 1/(K-1) * sum_j D(f_j || f_i) to
their loss (Anil et al. 2018, arXiv 1804.03235). The schedule is the exchange engine's
(`engine.py`), the object the CLI loop and the Trainer integration drive too; what this module
adds is where Accelerate assumes the world is one data-parallel group:

    set_seed once for the world        -> seed + g per group (`same_init`: one seed)
    deepspeed.initialize without mpu   -> mpu = my group (`group_sharding.engines_in_group`), then
                                          every parameter checked: partitioned over my group only
    fully_shard without a mesh         -> the ("codistill", "shard") mesh's shard dimension, then
                                          every parameter checked the same way
    loaders split over the world       -> over my group's S ranks, shuffled from my group
                                          leader's generator (`reshard_loader`, `shuffle_in_group`)
    one dataset                        -> rows g, g+K, ... for group g (`shard`)
    gather_for_metrics over the world  -> over my group (`gather_for_metrics`)
    a NaN loss                         -> my group stops before its next exchange: one line, exit 4

Engines: DeepSpeed ZeRO-1/2/3 (an `accelerate launch` DeepSpeed YAML) and FSDP2 on accelerator
devices. Accelerate 1.15 turns FSDP on only for accelerator process types (MULTI_GPU, MULTI_XPU,
...): under launch/accelerate/fsdp2.yaml on a CPU-only machine it reports distributed type NO
(checked by hand, 2 processes), so on CPU this path is DeepSpeed. Plain DDP over more than one
group is refused: it all-reduces gradients over the world, which is synchronous training. On a
machine without accelerators Accelerate 1.15 picks no process-group backend for DeepSpeed and
counts one process: create the Accelerator with `kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from codistill_ds.backends.materialize import check_initialized
from codistill_ds.config import CodistillConfig
from codistill_ds.distributed import comm
from codistill_ds.distributed.env import release_deepspeed_shm
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange import setup
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
from codistill_ds.integrations.group_sharding import (
    check_fsdp_in_group,
    engines_in_group,
    gather_in_group,
    group_shard,
    reshard_loader,
    shuffle_in_group,
    zero3_init_in_group,
)
from codistill_ds.integrations.model_parallel import refuse_model_parallelism
from codistill_ds.run.guards import NonFiniteLoss, check_finite_loss
from codistill_ds.run.watchdog import EXIT_NONFINITE, stop_process

WHO = "the Accelerate loop integration"


class Codistill:
    """One rank's codistillation state in an own Accelerate loop: topology, exchange engine,
    alpha schedule, NaN guard. Build it with `from_accelerator`, right after the Accelerator."""

    def __init__(self, accelerator: Any, config: CodistillConfig, topology: Topology, exchange_dataset: Any,
                 collate_fn: Any, seed: int, exchange_batch_size: int | None, transport: Transport | None,
                 digest: str) -> None:
        self.accelerator, self.config, self.topology = accelerator, config, topology
        self.exchange_dataset, self.collate_fn, self.seed = exchange_dataset, collate_fn, seed
        self.exchange_batch_size, self._transport, self._digest = exchange_batch_size, transport, digest
        self.distiller: Distiller | None = None
        """The exchange engine (`distiller.engine`) and its schedule: built by the first `prepare`
        that sees a DataLoader (or any, given `exchange_batch_size`)."""
        self._model: torch.nn.Module | None = None
        self._step: int | None = None
        self._joined = False
        self._loss_sum, self._loss_count = 0.0, 0

    @classmethod
    def from_accelerator(cls, accelerator: Any, config: CodistillConfig | None = None, *, exchange_dataset: Any,
                         collate_fn: Any = None, seed: int = 0, exchange_batch_size: int | None = None,
                         transport: Transport | None = None) -> Codistill:
        """Process groups, this group's seed, and the checks that must fail before any training
        collective. Call it after creating the Accelerator and before building the model: it
        seeds the model's initialization with `seed + g` (`same_init`: `seed`), so do not call
        `set_seed` after it. Collective over the world.

        `exchange_dataset`: map-style rows (dicts with `input_ids`, optionally `attention_mask`
        and `labels`), identical on every rank: exchange batches are drawn from it in a seeded
        order, the same in every group; `collate_fn` batches them (default: torch's).
        `exchange_batch_size`: rows per exchange (default: the training loader's batch size x S)."""
        from accelerate.utils import set_seed

        config = config or CodistillConfig()
        world = _world(accelerator)
        validate_integration(config, world, WHO, "use the plain loop: leave out Codistill")
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        refuse_model_parallelism(WHO, parallelism_config=accelerator.parallelism_config,
                                 ds_config=getattr(plugin, "deepspeed_config", None))
        _check_engine(accelerator, config, world)
        setup.check_lighthouse(config)
        release_deepspeed_shm()
        topology = topology_for(config, setup.parallel_dims(config, world, dist.get_rank() if world > 1 else 0))
        set_seed(setup.group_seed(seed, config, topology.group_id))
        digest = check_same_exchange_data(exchange_dataset, topology.dims)
        collate_fn = collate_fn or torch.utils.data.default_collate
        return cls(accelerator, config, topology, exchange_dataset, collate_fn, seed, exchange_batch_size,
                   transport, digest)

    # ---- before training ----------------------------------------------------------------
    @property
    def group_id(self) -> int:
        return self.topology.group_id

    @property
    def is_leader(self) -> bool:
        """Rank 0 of my group: the rank that prints or writes my group's records."""
        return self.topology.is_leader

    def shard(self, dataset: Any) -> Any:
        """Group g's training rows: g, g+K, g+2K, ... (`prepare` then splits them over the S ranks)."""
        return group_shard(dataset, self.topology.group_id, self.topology.groups)

    def checkpoint_dir(self, base: str) -> str:
        """`base/group{g}`: each group saves its own replica; groups would overwrite each other's
        files in one folder (ZeRO names its files by the rank inside the group)."""
        return os.path.join(base, f"group{self.topology.group_id}")

    @contextmanager
    def zero3_init(self) -> Iterator[None]:
        """Build the model inside this block when the Accelerate config sets `zero3_init_flag`:
        `from_config`/`from_pretrained` then partition over my group (not the world) and every
        group initializes or loads its own replica. A no-op otherwise."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3 or not plugin.zero3_init_flag:
            yield
            return
        with zero3_init_in_group(self.topology):
            yield

    def checkpoint_activations(self, model: Any, mode: str = "full") -> Any:
        """Activation checkpointing per transformer block, "none" | "full" | "selective" (every
        other block), as the CLI's `model.activation_checkpointing`: Transformers' per-layer
        switch, so parameter names, DeepSpeed/FSDP2 hooks and checkpoints are unchanged and the
        losses are the same. Call it on the model before or after `prepare`; returns the model."""
        from codistill_ds.backends.activation_checkpointing import checkpoint_layers

        checkpoint_layers(self.accelerator.unwrap_model(model), mode)
        return model

    def prepare(self, *objects: Any) -> Any:
        """`accelerator.prepare(*objects)` with the engine and the loaders inside my group, then
        checked: every parameter sharded over exactly my group, none NaN on any rank (a gather
        over the world), loaders serving rank r of S. Builds the exchange engine."""
        from accelerate.utils import DistributedType

        acc, t = self.accelerator, self.topology
        for obj in objects:
            if isinstance(obj, torch.nn.Module):  # loaded with tp_plan / DistributedConfig
                refuse_model_parallelism(WHO, model=obj)
        mesh = None
        if acc.is_fsdp2:
            mesh = t.shard_mesh(acc.device.type)
        with engines_in_group(t, acc.distributed_type == DistributedType.DEEPSPEED, mesh):
            prepared = acc.prepare(*objects)
        results = list(prepared) if len(objects) > 1 else [prepared]
        loader_batch = None
        for before, obj in zip(objects, results):
            if isinstance(obj, torch.utils.data.DataLoader):
                reshard_loader(obj, t)
                shuffle_in_group(obj, t)
                loader_batch = loader_batch or before.batch_size
            elif isinstance(obj, torch.nn.Module):
                if acc.is_fsdp2:  # DeepSpeed engines were checked at creation (engines_in_group)
                    check_fsdp_in_group(obj, t)
                check_initialized(obj)  # every rank of every group: no group may start from NaN
                self._model = self._model or obj
        if self.distiller is None and (loader_batch or self.exchange_batch_size):
            batch = self.exchange_batch_size or loader_batch * t.data_size
            engine = engine_for_dataset(self.config, t, dataset=self.exchange_dataset, digest=self._digest,
                                        seed=self.seed, batch=batch, collate=self.collate_fn,
                                        device=self.accelerator.device, vocab_size=self._vocab_size,
                                        transport=self._transport)
            self.distiller = Distiller(self.config, engine, self.seed)
        return prepared

    def _vocab_size(self) -> int:
        model = self.accelerator.unwrap_model(self._model) if self._model is not None else None
        return model_vocab_size(model)

    @property
    def engine(self) -> ExchangeEngine | None:
        """The exchange engine (`exchange/engine.py`): `stats`, `bytes_sent`, ..."""
        return None if self.distiller is None else self.distiller.engine

    def _distiller(self) -> Distiller:
        if self.distiller is None:
            raise RuntimeError("the exchange engine is built by codistill.prepare(...) given the training "
                               "DataLoader (its batch size x S rows per exchange), or exchange_batch_size= "
                               "in Codistill.from_accelerator")
        return self.distiller

    # ---- every step -----------------------------------------------------------------------
    def distill(self, loss: torch.Tensor, model: Any, step: int) -> torch.Tensor:
        """The loss to back-propagate at optimizer step `step` (0-based): `loss` plus
        alpha(step) times the divergence from the peers' predictions due now.

        Call it on every micro-batch, after the forward and before `accelerator.backward`. The
        first call of a step runs the exchange (eval-mode predictions on the exchange batch, when
        one is scheduled) and adds the distillation term once, scaled by the accumulation count
        because the backward averages micro-batches. Every call first stops my group if `loss`
        is NaN/Inf on any of its ranks: before the exchange, so the peers never receive
        predictions from diverged weights (one line, exit 4). Collective over my group."""
        distiller = self._distiller()
        self._guard(loss, step)
        if step == self._step:  # a later micro-batch of the same optimizer step
            return loss
        self._step = step
        if not self._joined:  # groups in separate jobs wait for each other before the first exchange
            setup.join_groups(distiller.engine.transport, self.config, self.topology)
            self._joined = True
        due = distiller.begin(step, lambda inputs: predict_logits(model, inputs))
        term = student_term(distiller, model, due)
        return loss if term is None else loss + self.accelerator.gradient_accumulation_steps * term

    def _guard(self, loss: torch.Tensor, step: int) -> None:
        t = self.topology
        value = float(loss.detach())
        try:
            check_finite_loss(value, t.group, step)
        except NonFiniteLoss as err:  # the same check as the CLI's; the advice in this loop's words
            text = str(err).replace("optim.lr", "the learning rate").replace("optim.warmup_steps", "the warmup")
            stop_process(f"rank {t.rank} (group {t.group_id}): {text}", EXIT_NONFINITE)
        self._loss_sum += value
        self._loss_count += 1

    def log_metrics(self) -> dict[str, float]:
        """My group's figures since the last call: `loss` (the mean of the losses `distill` saw,
        over my group's ranks), `distill_loss`, `alpha`, `agreement`, `cross_group_bytes`,
        `exchange_ms`, `exchange_compute_ms`, `peers`, `skipped_peers`, `group`. Collective over
        my group: every rank calls it at the same steps (print on `is_leader`)."""
        out = integration_metrics(self._distiller(), self.topology)
        if self._loss_count:
            out["loss"] = comm.group_mean(self._loss_sum / self._loss_count, self.topology.group)
            if self.engine is not None:  # the group's loss as the peers' guard sees it
                self.engine.note_loss(self._step, out["loss"])
        self._loss_sum, self._loss_count = 0.0, 0
        return out

    def gather_for_metrics(self, data: Any) -> Any:
        """`accelerator.gather_for_metrics` over my group: evaluation figures stay per replica."""
        return gather_in_group(data, self.topology, self.accelerator.gradient_state)

    # ---- checkpoints and the end ----------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's exchange state (peer targets waiting for their step when staleness > 0,
        byte and skipped-peer counts) and the last step seen: save one per rank beside the
        model's checkpoint (`checkpoint_dir`), e.g. `codistill_rank{r}.pt`."""
        return {"engine": self._distiller().engine.state_dict(), "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        """After `prepare`, before the first `distill` of the resumed run."""
        self._distiller().engine.load_state_dict(state["engine"])
        self._step = state["step"]

    def close(self) -> None:
        """Finish the exchanges still in flight (asynchronous swaps) and stop the transport."""
        if self.engine is not None:
            self.engine.close()


def _world(accelerator: Any) -> int:
    """The world the launcher started, which Accelerate must count too."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"Accelerate counts {accelerator.num_processes} process(es) but the launcher started {world}: "
            "on a machine without accelerators Accelerate 1.15 picks no backend for DeepSpeed; create the "
            "Accelerator with kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')]")
    return world


def _check_engine(accelerator: Any, config: CodistillConfig, world: int) -> None:
    """An engine that shards inside a group: DeepSpeed, or FSDP2 without world-wide loading."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise ValueError("codistillation shards on an FSDP2 mesh: set fsdp_version: 2 in the Accelerate config")
        if getattr(accelerator.state.fsdp_plugin, "cpu_ram_efficient_loading", False):
            raise ValueError("fsdp_cpu_ram_efficient_loading broadcasts global rank 0's weights over the world, "
                             "so every group would start from group 0's: set it to false")
        return
    if kind == DistributedType.DEEPSPEED or world == 1:
        return
    dims = setup.parallel_dims(config, world, dist.get_rank())
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        why = ("the launch asks for FSDP, but Accelerate 1.15 enables FSDP on accelerator devices only "
               f"(here: {kind.value}); on CPU use a DeepSpeed YAML")
    elif kind == DistributedType.NO:
        why = f"no engine would synchronize the {dims.group_size} ranks of a group"
    else:
        why = (f"{kind.value} all-reduces gradients over all {world} processes, across the {dims.groups} "
               "codistillation groups (synchronous training)")
    raise ValueError(f"Accelerate runs {kind.value} over {world} processes: {why}. Launch with a DeepSpeed "
                     "YAML (launch/accelerate/zero2.yaml, zero3.yaml) or FSDP2 on accelerator devices")

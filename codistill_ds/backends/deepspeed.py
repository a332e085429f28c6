"""DeepSpeed ZeRO-1/2/3 backend, sharded over my codistillation group through `mpu`.

The ZeRO stage and its knobs come from the JSON in `ds_configs/`; batch sizes, gradient
accumulation, clipping and precision come from the codistill config, so the two cannot disagree.
The optimizer is a client `torch.optim.AdamW` with a decayed and a non-decayed group: the
weight-decay schedule (first-class in codistillation) turns group 0 only, and DeepSpeed's fused
Adam would need a compile on CPU.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from codistill_ds.backends.base import decay_param_groups, set_optimizer_hyperparameters
from codistill_ds.backends.model import ModelRecipe
from codistill_ds.config import Config, resolve_path
from codistill_ds.distributed.topology import GroupMPU, Topology


def build_ds_config(cfg: Config, data_size: int, bf16: bool) -> dict:
    """The user's ZeRO JSON with the run's batch, accumulation, clipping and precision written in."""
    with open(resolve_path(cfg.backend.ds_config)) as f:
        ds = json.load(f)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.data.micro_batch_size * cfg.train.grad_accum * data_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_replica(recipe: ModelRecipe, ds_config: dict, group, bf16: bool) -> torch.nn.Module:
    """ZeRO-3: partitioned over my group while it is built (materialize.py), never whole on a
    rank, and filled from the pretrained folder partition by partition when there is one
    (pretrained.py); ZeRO-1/2 keep a whole replica on every rank anyway, so it is built whole."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return recipe.whole()
    dtype = torch.bfloat16 if bf16 else torch.float32
    if recipe.pretrained is not None:
        from codistill_ds.backends.pretrained import load_zero3

        return load_zero3(recipe.build, recipe.pretrained, group, ds_config, dtype)
    from codistill_ds.backends.materialize import build_zero3

    return build_zero3(recipe.build, group, ds_config, dtype)


class DeepSpeedBackend:
    """`Backend` over a `deepspeed.DeepSpeedEngine` whose data-parallel group is my group."""

    def __init__(self, recipe: ModelRecipe, cfg: Config, topology: Topology, bf16: bool) -> None:
        import deepspeed

        self._topology, self._recipe = topology, recipe
        ds_config = build_ds_config(cfg, topology.data_size, bf16)
        self._ds_config, self._bf16 = ds_config, bf16
        model = build_replica(recipe, ds_config, topology.dp_group, bf16)
        if cfg.model.activation_checkpointing != "none":  # per block, before the engine wraps the model
            from codistill_ds.backends.activation_checkpointing import checkpoint_layers

            checkpoint_layers(model, cfg.model.activation_checkpointing)
        optimizer = torch.optim.AdamW(
            decay_param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )
        if topology.tp > 1:  # AutoTP (ZeRO-1/2): DeepSpeed's own TP groups would span the groups
            from codistill_ds.backends.autotp import initialize_autotp

            config = copy.deepcopy(ds_config)
            config["tensor_parallel"] = {**config.get("tensor_parallel", {}), "autotp_size": topology.tp}
            self.engine = initialize_autotp(model, optimizer, config, tp_group=topology.tp_group,
                                            dp_group=topology.dp_group)
            self.optimizer = self.engine.optimizer
        else:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=copy.deepcopy(ds_config),
                mpu=GroupMPU(topology), dist_init_required=False,
            )
        self.module = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.engine(input_ids=input_ids.to(self.engine.device), use_cache=False).logits
        self.compute_dtype = logits.dtype
        return logits

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself (scale_wrt_gas).
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def set_hyperparameters(self, lr: float, weight_decay: float) -> None:
        set_optimizer_hyperparameters(self.optimizer.param_groups, lr, weight_decay)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: str, tag: str) -> None:
        """ZeRO partitions, fp32 master weights, optimizer moments and engine counters under
        directory/tag, the layout `zero_to_fp32` consolidates for `export`.

        Collective over the whole world: DeepSpeed barriers (and validates the tag) on the
        default group, so every group saves at the same step, each into its own directory."""
        self.engine.save_checkpoint(directory, tag=tag, save_latest=False)

    def load(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {os.path.abspath(directory)}")

    # ---- weight exchange ------------------------------------------------------------------
    def shards(self) -> list[torch.Tensor]:
        """This rank's ZeRO-3 partition of every parameter (what rank r of a peer group holds too)."""
        if self.zero_stage != 3:
            raise RuntimeError("weight exchange needs ZeRO-3 (stage 1/2 replicate parameters)")
        return [p.ds_tensor for p in self.engine.module.parameters()]

    def make_teacher(self) -> DeepSpeedTeacher:
        return DeepSpeedTeacher(self._recipe, self._ds_config, self._topology, self._bf16)


class DeepSpeedTeacher:
    """A frozen ZeRO-3 replica partitioned over my group exactly like the student (no optimizer),
    built partitioned too: its weights are overwritten by the first exchange."""

    def __init__(self, recipe: ModelRecipe, ds_config: dict, topology: Topology, bf16: bool) -> None:
        import deepspeed

        # No parameter may persist whole on a rank (DeepSpeed's default keeps those under
        # stage3_param_persistence_threshold gathered after first use): its forward would keep
        # the first values while `load_shards` writes only the partitions.
        ds_config = copy.deepcopy(ds_config)
        ds_config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
        model = build_replica(recipe, ds_config, topology.dp_group, bf16)
        for p in model.parameters():
            p.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(ds_config),
                                               mpu=GroupMPU(topology), dist_init_required=False)
        self.engine.eval()

    def load_shards(self, shards: list[torch.Tensor]) -> None:
        for p, src in zip(self.engine.module.parameters(), shards):
            p.ds_tensor.data.copy_(src.view_as(p.ds_tensor))

    def shards(self) -> list[torch.Tensor]:
        return [p.ds_tensor for p in self.engine.module.parameters()]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=input_ids.to(self.engine.device), use_cache=False).logits

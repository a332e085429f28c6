"""DeepSpeed ZeRO-1/2/3 backend, sharded over my codistillation group through `mpu`.

The ZeRO stage and its knobs come from the JSON in `ds_configs/`; batch sizes, gradient
accumulation, clipping and precision come from the codistill config, so the two cannot disagree.
The optimizer is a client `torch.optim.AdamW` with a decayed and a non-decayed group: the
weight-decay schedule (first-class in codistillation) turns group 0 only, and DeepSpeed's fused
Adam would need a compile on CPU.
"""

from __future__ import annotations

import json
import os

import torch

from ..config import Config, resolve_path
from ..topology import GroupMPU, Topology
from .base import decay_param_groups, set_optimizer_hyperparameters


def build_ds_config(cfg: Config, group_size: int, bf16: bool) -> dict:
    """The user's ZeRO JSON with the run's batch, accumulation, clipping and precision written in."""
    with open(resolve_path(cfg.backend.ds_config)) as f:
        ds = json.load(f)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.data.micro_batch_size * cfg.train.grad_accum * group_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10**9)
    return ds


class DeepSpeedBackend:
    """`Backend` over a `deepspeed.DeepSpeedEngine` whose data-parallel group is my group."""

    def __init__(self, model: torch.nn.Module, cfg: Config, topology: Topology, bf16: bool) -> None:
        import deepspeed

        ds_config = build_ds_config(cfg, topology.group_size, bf16)
        optimizer = torch.optim.AdamW(
            decay_param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            mpu=GroupMPU(topology), dist_init_required=False,
        )
        self.module = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=input_ids.to(self.engine.device), use_cache=False).logits

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
        self.engine.save_checkpoint(directory, tag=tag)

    def load(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {os.path.abspath(directory)}")

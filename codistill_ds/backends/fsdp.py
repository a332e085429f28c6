"""FSDP2 backend: `fully_shard` per transformer block and on the root, over my group's shard mesh.

The job's DeviceMesh (`Topology.mesh`: ("codistill", "dp_shard") = (K, S) when there is no HSDP
or TP) is built from the topology's own rail and group process groups, so FSDP never creates a
group that spans two codistillation groups: sharding, all-gathers and reduce-scatters run on
`Topology.shard_mesh`, i.e. inside my group only.
Gradient accumulation, clipping and the optimizer are handled here because FSDP2, unlike the
DeepSpeed engine, leaves them to the training loop.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.device_mesh import DeviceMesh

from codistill_ds.backends.base import decay_param_groups, set_optimizer_hyperparameters
from codistill_ds.backends.model import ModelRecipe
from codistill_ds.backends.pretrained import Pretrained
from codistill_ds.backends.sharding import apply_fsdp
from codistill_ds.config import Config
from codistill_ds.distributed.topology import Topology


def build_sharded(recipe: ModelRecipe, shard_mesh: DeviceMesh, bf16: bool, cpu_offload: bool,
                  reshard_after_forward: bool, device: torch.device) -> torch.nn.Module:
    """The replica sharded over the mesh without ever being whole on a rank: a meta-device
    skeleton is `fully_shard`ed, then each rank's shards come from a ZeRO-3 build over the same
    group (materialize.py: exact init, no copy where ZeRO's slices are FSDP2's rows)."""
    from codistill_ds.backends.materialize import build_zero3, fsdp_from_zero3

    group = shard_mesh.get_group()
    values = build_zero3(recipe.build, group)
    skeleton = apply_fsdp(recipe.skeleton(), shard_mesh, param_dtype=torch.bfloat16 if bf16 else None,
                          cpu_offload=cpu_offload, reshard_after_forward=reshard_after_forward)
    return fsdp_from_zero3(values, skeleton, group, torch.device("cpu") if cpu_offload else device)


class FSDPBackend:
    """`Backend` over an FSDP2-sharded module, a torch AdamW and manual accumulation."""

    def __init__(self, recipe: ModelRecipe, cfg: Config, topology: Topology, bf16: bool) -> None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        self._recipe, self._bf16, self.topology = recipe, bf16, topology
        self._offload, self._reshard = cfg.backend.fsdp_cpu_offload, cfg.backend.fsdp_reshard_after_forward
        self.shard_mesh = topology.shard_mesh(device_type)
        self.multi_mesh = topology.tp > 1 or topology.dims.replicate > 1
        """TP and/or HSDP: parameters on more than one mesh (the mesh-aware clip is needed)."""
        ac = cfg.model.activation_checkpointing
        if self.multi_mesh or ac != "none" or recipe.pretrained is not None:
            from codistill_ds.backends.replica import build_parallel_replica

            self.module = build_parallel_replica(
                recipe.build, tp_mesh=topology.tp_mesh(device_type), dp_mesh=self.shard_mesh, group=topology.group,
                activation_checkpointing=ac, param_dtype=torch.bfloat16 if bf16 else None,
                reshard_after_forward=self._reshard, cpu_offload=self._offload, device=self.device,
                weights=None if recipe.pretrained is None else Pretrained(recipe.pretrained))
        else:
            self.module = build_sharded(recipe, self.shard_mesh, bf16, self._offload, self._reshard, self.device)
        self.optimizer = torch.optim.AdamW(
            decay_param_groups(self.module, cfg.optim.weight_decay),
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        )
        self.accum, self.grad_clip = cfg.train.grad_accum, cfg.optim.grad_clip
        self._micro = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.module(input_ids=input_ids.to(self.device), use_cache=False).logits
        self.compute_dtype = logits.dtype
        return logits

    def backward(self, loss: torch.Tensor) -> None:
        # Same convention as DeepSpeed's engine: the loop passes the micro-step loss and the
        # backend averages over the accumulation steps.
        (loss / self.accum).backward()

    def step(self) -> None:
        """Count micro-steps; at the boundary clip (global norm over DTensor shards) and step."""
        self._micro += 1
        if self._micro % self.accum:
            return
        if self.grad_clip > 0 and self.multi_mesh:  # torch's clip refuses parameters on several meshes
            from codistill_ds.backends.sharding import clip_grad_norm_

            clip_grad_norm_(self.module.parameters(), self.grad_clip)
        elif self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_hyperparameters(self, lr: float, weight_decay: float) -> None:
        set_optimizer_hyperparameters(self.optimizer.param_groups, lr, weight_decay)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: str, tag: str) -> None:
        """Sharded model and optimizer state through `torch.distributed.checkpoint`, over my
        group's process group only: each rank writes its own shards into directory/tag, and
        `export` (or a different group size) reads them back as full tensors."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, tag),
                 process_group=self.topology.group)

    def load(self, directory: str, tag: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        path = os.path.join(directory, tag)
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"no FSDP checkpoint '{tag}' under {os.path.abspath(directory)}")
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path, process_group=self.topology.group)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self._micro = 0  # checkpoints are taken at optimizer-step boundaries

    # ---- weight exchange ------------------------------------------------------------------
    def shards(self) -> list[torch.Tensor]:
        """This rank's local DTensor shards, in parameter order."""
        return [p.to_local() for p in self.module.parameters()]

    def make_teacher(self) -> FSDPTeacher:
        return FSDPTeacher(self)


class FSDPTeacher:
    """A frozen replica sharded on the same shard mesh, so shard r of a peer fits my rank r."""

    def __init__(self, student: FSDPBackend) -> None:
        s = student
        self.module = build_sharded(s._recipe, s.shard_mesh, s._bf16, s._offload, s._reshard, s.device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.device = student.device

    @torch.no_grad()
    def load_shards(self, shards: list[torch.Tensor]) -> None:
        for p, src in zip(self.module.parameters(), shards):
            p.to_local().copy_(src.view_as(p.to_local()))

    def shards(self) -> list[torch.Tensor]:
        return [p.to_local() for p in self.module.parameters()]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=input_ids.to(self.device), use_cache=False).logits

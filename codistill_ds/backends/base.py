"""What the training loop needs from a sharding backend, and nothing more.

One loop, several backends (DeepSpeed ZeRO, FSDP2): a backend wraps the replica so that it is
sharded *inside my codistillation group only*, and exposes forward / backward / step and the
optimizer knobs the schedules turn. The loop never sees an engine or a mesh.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch


class Backend(Protocol):
    module: torch.nn.Module
    """The wrapped replica (DeepSpeed engine module or FSDP2-sharded module)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] in the compute dtype."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-step (already scaled by the loop)."""

    def step(self) -> None:
        """Optimizer step after the last micro-step of an optimizer step; clears gradients."""

    def set_hyperparameters(self, lr: float, weight_decay: float) -> None:
        """Apply the lr and weight-decay schedules (weight decay on the decayed group only)."""

    def train(self, mode: bool = True) -> None: ...

    def save(self, directory: str, tag: str) -> None:
        """Sharded engine state (weights, optimizer) into directory/tag; collective over my
        group (DeepSpeed: over the world, see deepspeed_backend). Called at step boundaries."""

    def load(self, directory: str, tag: str) -> None:
        """Restore what `save` wrote, on the same group size."""


@contextmanager
def evaluating(backend: Backend) -> Iterator[None]:
    """Eval mode without autograd, restoring train mode: teacher predictions carry no dropout."""
    backend.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        backend.train(True)


def decay_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only (nanoGPT's rule): norms and biases are 1-D and must not shrink to 0."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def set_optimizer_hyperparameters(param_groups: list[dict], lr: float, weight_decay: float) -> None:
    """Group 0 is the decayed group (see `decay_param_groups`); every group gets the lr."""
    for i, group in enumerate(param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = weight_decay

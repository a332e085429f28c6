"""One process holds the whole replica: the loop without a sharding engine.

For what runs outside a launched job but must train exactly as a group of the CLI does: the
quality benchmark's DiLoCo workers (torchft's `DiLoCo` wraps a plain `torch.optim` optimizer)
and its offline-distilled student, and unit tests of the loop. The optimizer, the decayed and
non-decayed parameter groups, gradient accumulation (the loop passes micro-step losses, the
backend averages them, as DeepSpeed does) and clipping are those of the FSDP2 backend.
"""

from __future__ import annotations

import os

import torch

from codistill_ds.backends.base import decay_param_groups, set_optimizer_hyperparameters
from codistill_ds.backends.model import ModelRecipe
from codistill_ds.config import Config


class LocalBackend:
    """`Backend` over an unsharded module on this process, a torch AdamW and manual accumulation."""

    def __init__(self, recipe: ModelRecipe, cfg: Config, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self._recipe = recipe
        self.module = recipe.whole().to(self.device)
        self.module.train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(decay_param_groups(self.module, o.weight_decay), lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps)
        self.accum, self.grad_clip = cfg.train.grad_accum, o.grad_clip
        self._micro = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.module(input_ids=input_ids.to(self.device), use_cache=False).logits
        self.compute_dtype = logits.dtype
        return logits

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        """Count micro-steps; at the boundary clip the global norm and step."""
        self._micro += 1
        if self._micro % self.accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_hyperparameters(self, lr: float, weight_decay: float) -> None:
        set_optimizer_hyperparameters(self.optimizer.param_groups, lr, weight_decay)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: str, tag: str) -> None:
        path = os.path.join(directory, tag)
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optim": self.optimizer.state_dict()},
                   os.path.join(path, "local.pt"))

    def load(self, directory: str, tag: str) -> None:
        path = os.path.join(directory, tag, "local.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no local checkpoint '{tag}' under {os.path.abspath(directory)}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self._micro = 0

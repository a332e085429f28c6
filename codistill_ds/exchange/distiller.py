"""One optimizer step of codistillation, as every driver sees it: the exchange schedule, written once.

    loss_i = CE(y, f_i(x)) + alpha(t) * 1/(K-1) * sum_{j != i} D(f_j(x_e) || f_i(x_e))

The CLI loop (`run/loop.py`), the Hugging Face Trainer (`integrations/hf_trainer`) and the
own-Accelerate-loop API (`integrations/accelerate_loop.py`) each call, per optimizer step:

    due = distiller.begin(step, predict)     # alpha(t); the exchange the engine runs now
    term = distiller.loss(students, due)     # alpha * D(peers || me) on the due batches, or None
    distiller.figures()                      # alpha, agreement, peers, bytes, timings, distill_loss

`predict` is the driver's teacher forward (eval mode, no graph); `students` are its train-mode
logits on the due batches (the CLI batches them with its first micro-batch, the integrations run
the model on each batch). Weight exchange (`mode: weights`) has no engine: its teachers are
local (`weights.py`) and the driver hands their targets to `loss` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from codistill_ds.config import CodistillConfig
from codistill_ds.exchange.batches import TargetBatch, batched_peer_loss
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.schedules import alpha_at


class Distiller:
    """alpha(t), the engine's step, the distillation term and the figures to log.

    Args:
        config: the codistill section (alpha schedule, loss, temperature, peer weights).
        engine: the exchange engine (`setup.build_engine`); None in weight-exchange mode.
        seed: the run's seed (keys the positions and samples; see `ExchangeSettings`).
    """

    def __init__(self, config: CodistillConfig, engine: ExchangeEngine | None, seed: int = 0) -> None:
        self.config, self.engine = config, engine
        self.settings = engine.settings if engine is not None else ExchangeSettings.from_config(config, seed)
        self.alpha = 0.0
        self.step_distill: float | None = None
        """This step's distillation value: the term's, else the engine's evaluation (burn-in)."""
        self.latest_distill: torch.Tensor | None = None
        """The latest distillation value of any step (the integrations log it at their intervals)."""
        self.step_agreement: float | None = None
        """This step's top-1 agreement with the peers (None when nothing was due)."""
        self.latest_agreement: float | None = None

    # ---- every step -----------------------------------------------------------------------
    def begin(self, step: int, predict: Callable[[Any], torch.Tensor] | None) -> list[TargetBatch]:
        """alpha(step), then the engine's step: an exchange when one is scheduled (`predict` the
        teacher side) and the peer targets due now."""
        cd = self.config
        self.alpha = alpha_at(step, cd.alpha, cd.burn_in, cd.ramp)
        self.step_distill, self.step_agreement = None, None
        if self.engine is None:
            return []
        due = self.engine.step(step, predict)
        stats = self.engine.stats
        if stats.distill_eval is not None:  # logged during burn-in too
            self.step_distill = stats.distill_eval
            self.latest_distill = torch.tensor(stats.distill_eval)
        if stats.agreement is not None:
            self.agree(stats.agreement)
        return due

    def loss(self, students: list[torch.Tensor], due: list[TargetBatch]) -> torch.Tensor | None:
        """alpha * D(peers || me) on the due batches, the students' [N, V] logits per batch (with
        their graph); None when nothing is due or alpha is 0."""
        if not due or self.alpha == 0:
            return None
        s = self.settings
        d = batched_peer_loss(students, due, s.loss, s.temperature, s.weights)
        self.step_distill = d.item()
        self.latest_distill = d.detach()
        return self.alpha * d

    def agree(self, agreement: float | None) -> None:
        """Record an agreement measured by the driver (where my predictions did not travel)."""
        self.step_agreement = agreement
        if agreement is not None:
            self.latest_agreement = agreement

    # ---- figures --------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.engine.bytes_sent if self.engine is not None else 0

    def figures(self) -> dict[str, Any]:
        """This step's exchange figures for a record (local values: callers take group means)."""
        stats = self.engine.stats if self.engine is not None else None
        return {
            "alpha": self.alpha, "agreement": self.step_agreement,
            "peers": stats.peers if stats is not None else None,
            "exchange_ms": stats.exchange_ms if stats is not None else 0.0,
            "exchange_compute_ms": stats.exchange_compute_ms if stats is not None else 0.0,
            "distill_loss": self.step_distill,
            "skipped_peers": self.engine.skipped_peers if self.engine is not None else 0,
            "skipped_reasons": dict(self.engine.skipped_reasons) if self.engine is not None else {},
        }

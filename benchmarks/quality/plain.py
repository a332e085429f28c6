"""One rank training one replica the way a 1-rank codistillation group of the CLI does.

The DiLoCo workers (diloco.py) and the offline-distilled student (hetero.py) cannot run inside
`codistill-ds train`: torchft's DiLoCo wraps a plain `torch.optim` optimizer, and an offline
teacher is not a peer. This trainer rebuilds what the CLI's loop does for one group from the
library's own pieces, from the same `--set` list: the model (`build_model`, seeded like group g),
the group's disjoint data shard (`TrainStream`), AdamW with the decayed/non-decayed groups,
the learning-rate and regularization schedules, gradient clipping, and the validation windows.
tests/test_quality_bench.py checks it against the CLI: with no outer step yet, a DiLoCo worker's
training losses equal the `independent` arm's group 0 losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from codistill_ds.backends.base import decay_param_groups, set_optimizer_hyperparameters
from codistill_ds.backends.model import build_model, count_parameters, set_dropout
from codistill_ds.config import Config
from codistill_ds.data.corpus import Corpus
from codistill_ds.data.streams import TrainStream, val_micro_batches
from codistill_ds.schedules import lr_at, piecewise_constant

DistillTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids [B, L], student logits [B, L, V]) -> the distillation loss of that batch."""


class PlainTrainer:
    """Model, inner optimizer, schedules and data of group `group` on a single process."""

    def __init__(self, cfg: Config, corpus: Corpus, group: int, groups: int, init_seed: int) -> None:
        self.cfg = cfg
        torch.manual_seed(init_seed)
        self.model = build_model(cfg.model, corpus.vocab_size, cfg.optim.dropout, init_seed)
        self.model.train()
        self.params = count_parameters(self.model)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(decay_param_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps)
        self.stream = TrainStream(corpus, cfg.seed, group, groups, 0, 1, cfg.data.micro_batch_size,
                                  cfg.train.grad_accum)
        self.val = val_micro_batches(corpus, 0, 1, cfg.data.micro_batch_size, cfg.data.val_batches)
        self._dropout: float | None = None

    def _schedules(self, step: int) -> None:
        o = self.cfg.optim
        lr = lr_at(step, o.lr, o.warmup_steps, self.cfg.train.steps, o.schedule, o.min_lr)
        set_optimizer_hyperparameters(self.optimizer.param_groups, lr,
                                      piecewise_constant(step, o.weight_decay, o.weight_decay_milestones))
        p = piecewise_constant(step, o.dropout, o.dropout_milestones)
        if p != self._dropout:
            set_dropout(self.model, p)
            self._dropout = p

    def train_step(self, step: int, distill: DistillTerm | None = None, alpha: float = 0.0) -> float:
        """One update; returns the mean cross-entropy of its micro-batches. `optimizer.step()`
        is where torchft's DiLoCo hooks in (its outer step runs after every H-th call)."""
        self._schedules(step)
        accum, total = self.cfg.train.grad_accum, 0.0
        for m in range(accum):
            batch = self.stream.micro_batch(step, m)
            logits = self.model(input_ids=batch[:, :-1], use_cache=False).logits
            ce = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss = ce if distill is None or alpha == 0 else ce + alpha * distill(batch, logits)
            (loss / accum).backward()
            total += ce.item()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accum

    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Mean next-token loss on the validation windows every arm scores (as the CLI's)."""
        model = model or self.model
        was_training = model.training
        model.eval()
        ce_sum, count = 0.0, 0
        with torch.no_grad():
            for batch in self.val:
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                ce_sum += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                          reduction="sum").item()
                count += batch[:, 1:].numel()
        model.train(was_training)
        return ce_sum / count

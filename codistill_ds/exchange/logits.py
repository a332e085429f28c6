"""A rank's logits as the exchange sees them: the whole vocabulary, or this rank's vocabulary slice.

With tensor parallelism (T > 1) a vocab-parallel `lm_head` leaves rank t with a DTensor sharded
along the vocabulary; everything downstream (the cross-entropy, the teacher's compression, the
student's distillation loss, agreement, the positions that travel) must then run on the slice
with the exact vocabulary-parallel math (`exchange/vocab/`), and a slice must never reach code
that expects the whole vocabulary (it would compute a wrong number without any error). So the
loop and the engine never touch logits directly: `as_rows` turns a backend's output into
[tokens, V] rows (a tensor) or a `VocabSlice` (not a tensor: the whole-vocabulary functions refuse
it), and every operation below takes either, choosing the implementation by type.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from codistill_ds.exchange import losses, sampling, wire
from codistill_ds.exchange import vocab as vp
from codistill_ds.exchange.vocab import VocabSlice

Rows = torch.Tensor | VocabSlice
"""[tokens, V] logits, or this rank's [tokens, V/T] slice of them."""


def is_vocab_sharded(logits: Any) -> bool:
    """A DTensor sharded along its last (vocabulary) dimension: a vocab-parallel head's output."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(logits, DTensor) and any(isinstance(p, Shard) and p.dim in (-1, logits.dim() - 1)
                                               for p in logits.placements)


def as_rows(logits: Any) -> Rows:
    """[B, L, V] model output -> [B*L, V] rows, or this rank's `VocabSlice` of a vocab-sharded
    DTensor (its gradient flows back into the DTensor)."""
    if is_vocab_sharded(logits):
        return VocabSlice.from_dtensor(logits)
    if not torch.is_tensor(logits):
        raise TypeError(f"expected logits as a tensor or a vocab-sharded DTensor, got {type(logits).__name__}")
    from torch.distributed.tensor import DTensor

    if isinstance(logits, DTensor):  # replicated (a TP head gathered back): the whole vocabulary
        logits = logits.full_tensor()
    return logits.flatten(0, -2)


def _on(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.to(x.device)


def take(x: Rows, start: int, stop: int) -> Rows:
    return x.rows(start, stop) if isinstance(x, VocabSlice) else x[start:stop]


def gather(x: Rows, index: torch.Tensor) -> Rows:
    """The rows at a flat `index` (the positions that travel under `token_fraction`)."""
    return x.index_rows(index) if isinstance(x, VocabSlice) else x[index.to(x.device)]


def num_tokens(x: Rows) -> int:
    return x.num_tokens() if isinstance(x, VocabSlice) else int(x.shape[0])


def detach(x: Rows) -> Rows:
    return x.detach()


def cross_entropy(x: Rows, labels: torch.Tensor, reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy in float32 (the same number on every TP rank of a slice)."""
    if isinstance(x, VocabSlice):
        return vp.cross_entropy(x, labels, ignore_index, reduction)
    return F.cross_entropy(x.float(), labels.to(x.device), ignore_index=ignore_index, reduction=reduction)


def peer_distill_loss(x: Rows, targets: list, loss: str, temperature: float, mask: torch.Tensor | None = None,
                      weights: list[float] | None = None) -> torch.Tensor:
    if isinstance(x, VocabSlice):
        return vp.peer_distill_loss(x, targets, loss, temperature, mask, weights)
    return losses.peer_distill_loss(x, targets, loss, temperature, _on(mask, x), weights)


def top1_agreement(x: Rows, target: Any, mask: torch.Tensor | None = None) -> tuple[int, int]:
    """(agreeing, counted) tokens; with a slice, the same on every TP rank of the group."""
    if isinstance(x, VocabSlice):
        return vp.top1_agreement(x, target, mask)
    return losses.top1_agreement(x, target, _on(mask, x))


def compress(x: Rows, topk: int, dtype: torch.dtype, kind: str, temperature: float, index_dtype: str = "auto"):
    """The teacher's payload (the same on every TP rank of a slice)."""
    if isinstance(x, VocabSlice):
        return vp.compress(x, topk, dtype, kind, temperature, index_dtype)
    return wire.compress(x, topk, dtype, kind, temperature, index_dtype)


def sample_targets(x: Rows, num_samples: int, temperature: float, value_dtype: str, index_dtype: str,
                   generator: torch.Generator | None):
    if isinstance(x, VocabSlice):
        return vp.sample_targets(x, num_samples, temperature, value_dtype, index_dtype, generator)
    return sampling.sample_targets(x, num_samples, temperature, value_dtype, index_dtype, generator)

"""The batches of an exchange: what a group predicts on, and the peers' targets it distills toward.

An `ExchangeBatch` is my slice of exchange batch e (the tokens I predict on, which positions
count); a `TargetBatch` is what the peers sent for it, due at some step. The loss over every
due batch and peer (`batched_peer_loss`) and the student's agreement with its peers
(`student_agreement`) are here, beside the position draw of `token_fraction` (`with_positions`),
so the sender and a receiver that rebuilds a peer's batch select the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from codistill_ds.distributed import comm
from codistill_ds.exchange import logits as lg
from codistill_ds.exchange.sampling import gather_positions, select_positions
from codistill_ds.exchange.wire import CompressedLogits


@dataclass
class ExchangeBatch:
    """Model inputs of one exchange batch slice, and which positions count (None: all)."""

    inputs: Any
    """What `predict` and the student take: a token tensor [B, L+1] (CLI) or a dict (HF)."""
    mask: torch.Tensor | None = None
    """[B*L] bool over the prediction rows; padding and ignore_index positions are False."""
    rows: range | None = None
    """Which rows of exchange batch e these are (global, the same numbering in every group):
    the token positions that travel under `token_fraction` are drawn per row."""
    positions: torch.Tensor | None = None
    """[B, m] positions whose predictions travel (None: every position); set by the engine."""


@dataclass
class TargetBatch:
    """Peers' predictions for one exchange batch, due at a step."""

    exchange: int
    inputs: Any
    """Inputs to run the student on; None: the rows are my own first training micro-batch."""
    peers: list[CompressedLogits]
    peer_groups: list[int]
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    """[B, m]: the peers' predictions cover only these positions of each sequence; the student's
    logits are taken at the same ones (`batched_peer_loss`)."""


def with_positions(batch: ExchangeBatch, e: int, seed: int, fraction: float) -> ExchangeBatch:
    """`batch` with the positions that travel under `token_fraction` (the same draw in every
    group: keyed by seed, exchange index and global row) and its mask at those positions."""
    if fraction >= 1.0 or batch.rows is None:
        return batch
    b = len(batch.rows)
    length = batch.mask.numel() // b if batch.mask is not None else sequence_length(batch.inputs)
    pos = select_positions(seed, e, batch.rows, length, fraction)
    mask = None if batch.mask is None else gather_positions(batch.mask.view(b, length), pos)
    return replace(batch, mask=mask, positions=pos)


def at_positions(logits: lg.Rows, positions: torch.Tensor | None) -> lg.Rows:
    """[B*L, V] logits (or a vocabulary slice of them) at the positions whose predictions
    travel, [B*m, V] in (sequence, position) order (all when None)."""
    if positions is None:
        return logits
    b = positions.shape[0]
    length = lg.num_tokens(logits) // b
    rows = torch.arange(b * length).view(b, length)
    return lg.gather(logits, gather_positions(rows, positions))


def sequence_length(inputs: Any) -> int:
    """L of the predictions on `inputs`: the CLI's tokens hold L+1 (the last is only a label)."""
    if isinstance(inputs, dict):
        return int(inputs["input_ids"].shape[1])
    return int(inputs.shape[1]) - 1


def _mask_on(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The losses move the mask to the logits' device themselves."""
    return mask


def batched_peer_loss(students: list[lg.Rows], batches: list[TargetBatch], loss: str,
                      temperature: float, weight_of: Callable[[int], float] | None = None) -> torch.Tensor:
    """(Weighted) mean over every peer of every batch of D(peer || student); the student's
    [N, V] logits per batch. With one batch and no weights, exactly `peer_distill_loss`."""
    if len(students) != len(batches) or not batches:
        raise ValueError(f"need one student logits tensor per target batch, got {len(students)} for {len(batches)}")
    students = [at_positions(s, b.positions) for s, b in zip(students, batches)]
    weights = [[1.0 if weight_of is None else weight_of(g) for g in b.peer_groups] for b in batches]
    if len(batches) == 1:
        b = batches[0]
        return lg.peer_distill_loss(students[0], b.peers, loss, temperature, _mask_on(b.mask),
                                    None if weight_of is None else weights[0])
    total = sum(sum(w) * lg.peer_distill_loss(s, b.peers, loss, temperature, _mask_on(b.mask), w)
                for s, b, w in zip(students, batches, weights))
    return total / sum(sum(w) for w in weights)


def student_agreement(students: list[lg.Rows], batches: list[TargetBatch], group: Any) -> float | None:
    """Top-1 agreement of the student's logits with its peers' predictions on the same tokens,
    over `group` (my group): the measure where my own predictions do not travel (predictions on
    my own training batch, weight exchange). Callers measure it whether or not alpha > 0, so
    independent models (alpha 0) still report how far apart they are."""
    agree, count = 0, 0
    for s, b in zip(students, batches):
        s = at_positions(lg.detach(s), b.positions)
        for p in b.peers:
            a, c = lg.top1_agreement(s, p, b.mask)
            agree, count = agree + a, count + c
    total = comm.reduce_numbers([agree, count], group=group)
    return total[0] / total[1] if total[1] > 0 else None


def own_rows(micro_batch: int, token_fraction: float) -> int:
    """Sequences of a peer's training micro-batch that I predict on (`exchange_batch: train`):
    the first ceil(f x b), whole, so that the teacher's forward shrinks with the fraction."""
    return max(1, math.ceil(token_fraction * micro_batch - 1e-9))


def students_of(rows: lg.Rows, n: int, length: int, batches: list[TargetBatch]) -> list[lg.Rows]:
    """The student's [N, V] logits (or slice) for each target batch out of one batched forward's
    rows (`length` per sequence): rows of my own micro-batch (inputs None: the first sequences the
    peers predicted on, all n unless `token_fraction` cut them, `own_rows`) or of the exchange
    tokens appended after it, in order."""
    out, offset = [], n
    for b in batches:
        if b.inputs is None:
            covered = b.peers[0].num_tokens() // length if b.peers else n
            out.append(lg.take(rows, 0, min(covered, n) * length))
        else:
            k = b.inputs.shape[0]
            out.append(lg.take(rows, offset * length, (offset + k) * length))
            offset += k
    return out

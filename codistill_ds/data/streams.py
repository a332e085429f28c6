"""Token streams: each group's own training shard, one exchange stream shared by all, validation.

Anil et al. (2018) found that codistillation works best when each replica sees different data,
so group g trains only on sequences whose index is g mod K. The exchange stream is the opposite:
every group draws the *same* exchange batch e (same seed, same order), so only logits need to
cross groups, never tokens. Both streams are pure functions of (seed, step): nothing to carry
across a restart but the step number, and an asynchronous exchange can re-read batch e later.

Inside a group the streams are split by *data rank* (docs/design.md, "Axes"): the A = R x D
ranks that read different tokens; the T tensor-parallel ranks of a data rank read the same.
"""

from __future__ import annotations

import numpy as np
import torch

from codistill_ds.data.corpus import Corpus, Windows
from codistill_ds.data.sources import DataError
from codistill_ds.data.streaming import DocumentStream

EXCHANGE_STREAM_TAG = 1_000_003
"""Mixed into the exchange stream's seed so it never coincides with a training permutation."""



class EpochPermutation:
    """Position p of an endless stream over n items: epoch p // n reshuffled with (seed, epoch).

    Holds one epoch's permutation: 4 bytes per window (8 past 2**31 windows), the only memory
    of a stream over memory-mapped shards that grows with the corpus."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty_like(positions)
        for epoch in np.unique(positions // self.n):
            if epoch != self._epoch:
                self._epoch = int(epoch)
                perm = np.random.default_rng([self.seed, self._epoch]).permutation(self.n)
                self._perm = perm.astype(np.int32) if self.n < 1 << 31 else perm
            sel = positions // self.n == epoch
            out[sel] = self._perm[positions[sel] % self.n]
        return out


def _group_shard(train: Windows, group: int, groups: int) -> Windows:
    """Group g's disjoint part: every K-th window; for a stream, the documents hashed to g."""
    if isinstance(train, DocumentStream):
        return train.for_group(group, groups)
    return train[group::groups]


def _ordered(data: Windows, seed: int):
    """(what to index, order of positions): random-access windows through a per-epoch
    permutation; a stream shuffles its documents itself and is read in order."""
    if isinstance(data, DocumentStream):
        return data.shuffled(seed), None
    return data, EpochPermutation(len(data), seed)


class TrainStream:
    """Group `group`'s disjoint shard; data rank `data_rank` gets its slice of each micro-batch.

    Step t, micro-step m covers group positions [(t*M + m)*A*b, +A*b) (M micro-steps, A data
    ranks); data rank a takes the a-th run of b sequences, the usual data-parallel split."""

    def __init__(self, corpus: Corpus, seed: int, group: int, groups: int,
                 data_rank: int, data_size: int, micro_batch: int, grad_accum: int) -> None:
        shard = _group_shard(corpus.train, group, groups)
        if not isinstance(shard, DocumentStream) and len(shard) < data_size * micro_batch:
            raise DataError(
                f"data: group {group} has {len(shard)} training sequences, fewer than one "
                f"micro-batch across its ranks ({data_size} x {micro_batch})"
            )
        self.data, self.order = _ordered(shard, seed)
        self.rank, self.size = data_rank, data_size
        self.b, self.accum = micro_batch, grad_accum

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        start = ((step * self.accum + micro) * self.size + self.rank) * self.b
        return _take(self.data, self.order, np.arange(start, start + self.b))

    def sequences_per_step(self) -> int:
        return self.size * self.b * self.accum


class ExchangeStream:
    """The exchange batch e, identical on every group; data rank a gets the a-th 1/A slice."""

    def __init__(self, corpus: Corpus, seed: int, batch: int, data_rank: int, data_size: int) -> None:
        if batch % data_size:
            raise DataError(f"data.exchange_batch_size={batch} is not divisible by {data_size} data ranks per group")
        self.data, self.order = _ordered(corpus.train, seed + EXCHANGE_STREAM_TAG)
        self.slice = batch // data_size
        self.batch, self.rank = batch, data_rank

    def batch_slice(self, e: int) -> torch.Tensor:
        start = e * self.batch + self.rank * self.slice
        return _take(self.data, self.order, np.arange(start, start + self.slice))


def _take(data, order: EpochPermutation | None, positions: np.ndarray) -> torch.Tensor:
    return data[positions if order is None else order(positions)]


def val_micro_batches(corpus: Corpus, data_rank: int, data_size: int, micro_batch: int,
                      max_batches: int) -> list[torch.Tensor]:
    """The same validation windows on every group; ranks of a group take turns. Only the
    windows evaluated are read (a shard view or a stream is never materialized whole)."""
    need = max_batches * data_size * micro_batch
    if isinstance(corpus.val, DocumentStream):
        head = corpus.val.head(need)
    else:
        head = corpus.val[np.arange(min(need, len(corpus.val)))]
    out = []
    for i in range(max_batches):
        start = (i * data_size + data_rank) * micro_batch
        if start + micro_batch > len(head):
            break
        out.append(head[start : start + micro_batch])
    return out

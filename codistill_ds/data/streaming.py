"""Corpora streamed from local files at run time with `datasets` (`data.streaming: true`).

No tokenizing pass and nothing held whole: documents come through an `IterableDataset`
(a text file's paragraphs, or JSONL rows), are tokenized as they arrive and packed into the
(seq_len + 1)-token windows of the in-memory path (documents joined by "\n", a window every
seq_len tokens). What the streams in data.py guarantee, and what changes against the
random-access corpora (in memory or shards):

- Group-disjoint training data, fixed for the whole run: a document belongs to group
  hash(text) mod K, so groups split *documents* (not windows), about equally. Not
  `split_dataset_by_node`: datasets applies its split on top of the shuffled stream, so with
  `set_epoch` a group's share changes every epoch (datasets 5.2: in epoch 1 group 0 gets
  documents group 1 had in epoch 0), and each replica would end up seeing all the data.
- One shared exchange stream: every group reads all training documents in the same order.
- Pure functions of (seed, group, step): epoch e is `docs.shuffle(seed, buffer_size)` with
  `set_epoch(e)`, deterministic on every rank. The shuffle is datasets' approximate one (file
  order, then a buffer of `data.shuffle_buffer` documents), not a full permutation.
- Exact resume, at a cost: a position is reached by reading the stream from its start, so a
  run resumed at step t re-reads and re-tokenizes the t steps' windows before training (no
  model compute); every rank of a group reads its group's whole stream and keeps its slices.
- Text files are read by paragraph (blank-line separated): a file without blank lines is one
  document, held whole while it is tokenized; give such corpora as JSONL rows.
- Validation: documents whose hash falls in 1 of round(1 / data.val_fraction) buckets, the
  same on every rank in any order; the first windows of that split, unshuffled.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import count

import numpy as np
import torch

from codistill_ds.data.sources import DataError, load_local_dataset, resolve_format


def document_bucket(text: str) -> int:
    """A document's place in every split, by content: the same on every rank, in any order."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"codistill.split").digest()
    return int.from_bytes(h, "little")


def is_validation(text: str, every: int) -> bool:
    return every > 0 and document_bucket(text) % every == 0


def group_of(text: str, every: int, groups: int) -> int:
    """The group that trains on this document (other bits of the hash than validation's)."""
    return (document_bucket(text) // max(every, 1)) % groups


def packed_windows(texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Documents joined by "\\n", cut into windows of seq_len + 1 tokens every seq_len tokens
    (the layout of data._windows); the tail shorter than a window is dropped."""
    newline = tokenizer.encode("\n")
    buf = np.empty(0, dtype=np.int64)
    for n, text in enumerate(texts):
        parts = [buf, newline, tokenizer.encode(text)] if n else [buf, tokenizer.encode(text)]
        buf = np.concatenate(parts).astype(np.int64, copy=False)
        k = (len(buf) - 1) // seq_len
        for w in range(k):
            yield buf[w * seq_len: w * seq_len + seq_len + 1].copy()  # not a view pinning buf
        buf = buf[k * seq_len:]


@dataclass(frozen=True, eq=False)
class DocumentStream:
    """A split of the streamed corpus: training documents (of one group, or all), or validation."""

    files: tuple[str, ...]
    fmt: str
    text_field: str
    tokenizer: object
    seq_len: int
    val_every: int
    shuffle_buffer: int
    split: str = "train"
    group: int = 0
    groups: int = 1

    def for_group(self, group: int, groups: int) -> DocumentStream:
        return replace(self, group=group, groups=groups)

    def texts(self, seed: int | None, epoch: int) -> Iterator[str]:
        """This split's documents; shuffled for epoch `epoch` when a seed is given."""
        sample_by = "paragraph" if self.fmt == "text" else "document"
        ds = load_local_dataset(list(self.files), self.fmt, streaming=True, sample_by=sample_by)
        field = self.text_field if self.fmt == "jsonl" else "text"
        ds = ds.filter(lambda row: self.keeps(_text(row, field)))
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
        return (_text(row, field) for row in ds)

    def keeps(self, text: str) -> bool:
        """Whether a document is in this split (and this group's share of training)."""
        if self.split == "val":
            return is_validation(text, self.val_every)
        return not is_validation(text, self.val_every) and (
            self.groups == 1 or group_of(text, self.val_every, self.groups) == self.group)

    def shuffled(self, seed: int) -> PackedStream:
        """The endless window stream, epoch after epoch, each reshuffled from `seed`."""
        return PackedStream(self, seed)

    def head(self, n: int) -> torch.Tensor:
        """The first n windows (fewer if the split is shorter), unshuffled: validation."""
        rows = []
        for w in packed_windows(self.texts(None, 0), self.tokenizer, self.seq_len):
            if len(rows) == n:
                break
            rows.append(w)
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.seq_len + 1, dtype=torch.long)

    def digest(self) -> str:
        """Names the corpus by content (sizes and first MiB of each file), not by path: paths may
        differ per node."""
        h = hashlib.sha1(f"{self.fmt}:{self.text_field}:{self.seq_len}:{self.val_every}:{self.split}".encode())
        for path in self.files:
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
                h.update(str(f.seek(0, 2)).encode())
        return h.hexdigest()[:16]


def _text(row: dict, field: str) -> str:
    text = row.get(field)
    if not isinstance(text, str):
        what = "missing" if field not in row else f"{text!r}, not text"
        raise DataError(f"data.text_field: '{field}' of a row is {what} (columns: {sorted(row)})")
    return text


class PackedStream:
    """Window p of the endless shuffled stream, read forward; positions asked for must not go
    back further than the last request's first (else the stream is re-read from its start)."""

    def __init__(self, source: DocumentStream, seed: int) -> None:
        self.source, self.seed = source, seed
        self._restart()

    def _restart(self) -> None:
        self._it, self._base, self._cache = self._windows(), 0, deque()

    def _windows(self) -> Iterator[np.ndarray]:
        for epoch in count():
            n = 0
            for w in packed_windows(self.source.texts(self.seed, epoch), self.source.tokenizer, self.source.seq_len):
                n += 1
                yield w
            if n == 0:
                s = self.source
                raise DataError(f"data.train_files: the streamed {s.split} documents of group {s.group} of "
                                f"{s.groups} hold no window of seq_len+1={s.seq_len + 1} tokens")

    def __getitem__(self, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions)
        lo, hi = int(positions.min()), int(positions.max())
        if lo < self._base:
            self._restart()
        while self._cache and self._base < lo:
            self._cache.popleft()
            self._base += 1
        while self._base + len(self._cache) <= hi:
            w = next(self._it)
            if self._base + len(self._cache) < lo:
                self._base += 1  # another rank's window
            else:
                self._cache.append(w)
        return torch.from_numpy(np.stack([self._cache[int(p) - self._base] for p in positions]))


def stream_corpus_parts(cfg, tokenizer) -> tuple[DocumentStream, DocumentStream]:
    """(training split, validation split) of `cfg.train_files` (a DataConfig) read as a stream."""
    if not cfg.train_files:
        raise DataError("data.streaming: streams data.train_files, which is empty (the built-in corpus "
                        "is read in memory)")
    files = tuple(cfg.train_files)
    every = round(1 / cfg.val_fraction) if cfg.val_fraction > 0 else 0
    train = DocumentStream(files, resolve_format(cfg.format, list(files)), cfg.text_field, tokenizer,
                           cfg.seq_len, every, cfg.shuffle_buffer)
    return train, replace(train, split="val")

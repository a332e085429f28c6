"""Token streams: each group's own training shard, one exchange stream shared by all, validation.

Anil et al. (2018) found that codistillation works best when each replica sees different data,
so group g trains only on sequences whose index is g mod K. The exchange stream is the opposite:
every group draws the *same* exchange batch e (same seed, same order), so only logits need to
cross groups, never tokens. Both streams are pure functions of (seed, step): nothing to carry
across a restart but the step number, and an asynchronous exchange can re-read batch e later.

The windows come from text tokenized here and held in memory (the default, capped by
data.max_bytes), from token shards written once by `codistill-ds tokenize` and memory-mapped
(shards.py), or from local files streamed through `datasets` (streaming.py, which states what
changes for streams).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from codistill_ds.config import DataConfig
from codistill_ds.data.shards import ShardError, TokenShards, WindowView, is_shard_dir
from codistill_ds.data.sources import DataError, check_text_file, read_documents
from codistill_ds.data.streaming import DocumentStream, stream_corpus_parts

EXCHANGE_STREAM_TAG = 1_000_003
"""Mixed into the exchange stream's seed so it never coincides with a training permutation."""


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): needs no download and no training."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (never fetched from a hub)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str):
    """`byte` or a path to a local tokenizer directory."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


Windows = torch.Tensor | WindowView | DocumentStream
"""A corpus split: int64 windows in memory, a memory-mapped view of token shards, or a stream."""


@dataclass
class Corpus:
    """Token ids split into non-overlapping (seq_len + 1)-token training and validation windows.

    The streams below only index `train`/`val` as `train[g::K]` (a group's shard) and
    `windows[index_array]` (a batch), which the tensor and the shard view answer alike; a
    stream is split and read forward instead (streaming.py)."""

    train: Windows  # [n_train, seq_len + 1] int64
    val: Windows  # [n_val, seq_len + 1]
    vocab_size: int


def build_corpus(cfg: DataConfig, tokenizer=None) -> Corpus:
    """The corpus `cfg` names: token shards (one directory written by `codistill-ds tokenize`),
    a stream (`data.streaming`), or text tokenized here and held in memory."""
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    if cfg.format == "shards" or (len(cfg.train_files) == 1 and is_shard_dir(cfg.train_files[0])):
        return shard_corpus(cfg, tokenizer.vocab_size)
    if cfg.streaming:
        return stream_corpus(cfg, tokenizer)
    text = "\n".join(read_documents(cfg))
    if cfg.max_bytes:
        text = text[: cfg.max_bytes]
    if not text.strip():
        raise DataError(f"data.train_files: {list(cfg.train_files)} hold no text (only empty documents)")
    ids = tokenizer.encode(text)
    n_train = len(ids) - int(len(ids) * cfg.val_fraction)
    train, val = _windows(ids[:n_train], cfg.seq_len), _windows(ids[n_train:], cfg.seq_len)
    _check_split(cfg, n_train, len(ids) - n_train, len(train), len(val))
    return Corpus(train=train, val=val, vocab_size=tokenizer.vocab_size)


def shard_corpus(cfg: DataConfig, vocab_size: int) -> Corpus:
    """Memory-mapped windows over token shards, split at the same token as the in-memory path
    (the tail `val_fraction` of the stream); `data.max_bytes` does not apply (tokenize cuts)."""
    if len(cfg.train_files) != 1 or not os.path.isdir(cfg.train_files[0]):
        raise DataError(f"data.train_files: token shards are read from one directory, got {list(cfg.train_files)}")
    try:
        shards = TokenShards(cfg.train_files[0])
    except ShardError as err:
        raise DataError(f"data.train_files: {err}") from None
    index = shards.index
    if index.vocab_size != vocab_size:
        raise DataError(f"data.tokenizer: the shards in {cfg.train_files[0]} were tokenized with "
                        f"'{index.tokenizer}' (vocab {index.vocab_size}); data.tokenizer has vocab "
                        f"{vocab_size}: set data.tokenizer to that tokenizer")
    n_train = index.tokens - int(index.tokens * cfg.val_fraction)
    train = WindowView(shards, 0, n_train, cfg.seq_len)
    val = WindowView(shards, n_train, index.tokens - n_train, cfg.seq_len)
    _check_split(cfg, n_train, index.tokens - n_train, len(train), len(val))
    return Corpus(train=train, val=val, vocab_size=vocab_size)


def stream_corpus(cfg: DataConfig, tokenizer) -> Corpus:
    """Documents read and tokenized while training (streaming.py); only the first validation
    micro-batch is read here, to fail at start on a split too small."""
    for path in cfg.train_files:
        check_text_file(path)
    train, val = stream_corpus_parts(cfg, tokenizer)
    if cfg.val_fraction > 0:
        n = len(val.head(cfg.micro_batch_size))
        if n < cfg.micro_batch_size:
            raise DataError(f"data.val_fraction: the streamed validation documents (1 in {val.val_every} "
                            f"by content hash) hold {n} windows of seq_len+1={cfg.seq_len + 1} tokens, "
                            f"fewer than one micro-batch of {cfg.micro_batch_size}; raise data.val_fraction")
    return Corpus(train=train, val=val, vocab_size=tokenizer.vocab_size)


def _check_split(cfg: DataConfig, train_tokens: int, val_tokens: int, n_train: int, n_val: int) -> None:
    if n_train == 0:
        raise DataError(
            f"data.seq_len: the training split has {train_tokens} tokens, fewer than one sequence "
            f"of seq_len+1={cfg.seq_len + 1}"
        )
    if cfg.val_fraction > 0 and n_val < cfg.micro_batch_size:
        raise DataError(
            f"data.seq_len: the validation split ({cfg.val_fraction:g} of the corpus) has "
            f"{val_tokens} tokens: {n_val} sequences of seq_len+1={cfg.seq_len + 1}, fewer than "
            f"one micro-batch of {cfg.micro_batch_size}; lower seq_len or raise data.val_fraction"
        )


def corpus_digest(train: Windows) -> str:
    """Names the training windows cheaply, for the start-up check that every rank trains on the
    same corpus (health.fingerprint): shards and streams from their metadata, never every token;
    a tensor from a sample of rows."""
    if isinstance(train, (WindowView, DocumentStream)):
        return train.digest()
    rows = train[:: max(1, len(train) // 4096)]
    return hashlib.sha1(repr(tuple(train.shape)).encode() + rows.numpy().tobytes()).hexdigest()[:16]


def _windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = (len(ids) - 1) // seq_len
    if n <= 0:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(ids[idx].astype(np.int64))


class _EpochPermutation:
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
    return data, _EpochPermutation(len(data), seed)


class TrainStream:
    """Group `group`'s disjoint shard; rank `group_rank` gets its slice of each micro-batch.

    Step t, micro-step m covers group positions [(t*A + m)*S*b, +S*b); rank r takes the r-th run
    of b sequences, the usual data-parallel split inside a group."""

    def __init__(self, corpus: Corpus, seed: int, group: int, groups: int,
                 group_rank: int, group_size: int, micro_batch: int, grad_accum: int) -> None:
        shard = _group_shard(corpus.train, group, groups)
        if not isinstance(shard, DocumentStream) and len(shard) < group_size * micro_batch:
            raise DataError(
                f"data: group {group} has {len(shard)} training sequences, fewer than one "
                f"micro-batch across its ranks ({group_size} x {micro_batch})"
            )
        self.data, self.order = _ordered(shard, seed)
        self.rank, self.size = group_rank, group_size
        self.b, self.accum = micro_batch, grad_accum

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        start = ((step * self.accum + micro) * self.size + self.rank) * self.b
        return _take(self.data, self.order, np.arange(start, start + self.b))

    def sequences_per_step(self) -> int:
        return self.size * self.b * self.accum


class ExchangeStream:
    """The exchange batch e, identical on every group; rank r gets the r-th 1/S slice."""

    def __init__(self, corpus: Corpus, seed: int, batch: int, group_rank: int, group_size: int) -> None:
        if batch % group_size:
            raise DataError(f"data.exchange_batch_size={batch} is not divisible by {group_size} ranks per group")
        self.data, self.order = _ordered(corpus.train, seed + EXCHANGE_STREAM_TAG)
        self.slice = batch // group_size
        self.batch, self.rank = batch, group_rank

    def batch_slice(self, e: int) -> torch.Tensor:
        start = e * self.batch + self.rank * self.slice
        return _take(self.data, self.order, np.arange(start, start + self.slice))


def _take(data, order: _EpochPermutation | None, positions: np.ndarray) -> torch.Tensor:
    return data[positions if order is None else order(positions)]


def val_micro_batches(corpus: Corpus, group_rank: int, group_size: int, micro_batch: int,
                      max_batches: int) -> list[torch.Tensor]:
    """The same validation windows on every group; ranks of a group take turns. Only the
    windows evaluated are read (a shard view or a stream is never materialized whole)."""
    need = max_batches * group_size * micro_batch
    if isinstance(corpus.val, DocumentStream):
        head = corpus.val.head(need)
    else:
        head = corpus.val[np.arange(min(need, len(corpus.val)))]
    out = []
    for i in range(max_batches):
        start = (i * group_size + group_rank) * micro_batch
        if start + micro_batch > len(head):
            break
        out.append(head[start : start + micro_batch])
    return out

"""The corpus a run trains on: token ids cut into (seq_len + 1)-token windows, split into training
and validation.

The windows come from text tokenized here and held in memory (the default, capped by
data.max_bytes), from token shards written once by `codistill-ds tokenize` and memory-mapped
(shards.py), or from local files streamed through `datasets` (streaming.py, which states what
changes for streams). The validation split is the tail of the stream, identical for every group.
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
from codistill_ds.data.tokenizers import load_tokenizer

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

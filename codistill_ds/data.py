"""Token streams: each group's own training shard, one exchange stream shared by all, validation.

Anil et al. (2018) found that codistillation works best when each replica sees different data,
so group g trains only on sequences whose index is g mod K. The exchange stream is the opposite:
every group draws the *same* exchange batch e (same seed, same order), so only logits need to
cross groups, never tokens. Both streams are pure functions of (seed, step): nothing to carry
across a restart but the step number, and an asynchronous exchange can re-read batch e later.
"""

from __future__ import annotations

import codecs
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig

EXCHANGE_STREAM_TAG = 1_000_003
"""Mixed into the exchange stream's seed so it never coincides with a training permutation."""


class DataError(ValueError):
    """A corpus that cannot feed the configured run; raised before training starts."""


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


def stdlib_sources(max_bytes: int | None) -> list[str]:
    """The installed standard library's .py files, sorted: a corpus on every machine, no download.

    Test suites are skipped (huge generated literals) and files are read in a fixed order, so the
    corpus is a deterministic function of the Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in {"test", "site-packages", "idlelib", "lib2to3"} or "tests" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if max_bytes and total >= max_bytes:
            break
    return texts


def read_documents(cfg: DataConfig) -> list[str]:
    """Documents from local text/jsonl files through `datasets`, or the built-in corpus."""
    if not cfg.train_files:
        return stdlib_sources(cfg.max_bytes)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    for path in cfg.train_files:
        check_text_file(path)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "jsonl" if all(f.endswith((".jsonl", ".json")) for f in cfg.train_files) else "text"
    try:
        if fmt == "text":
            ds = load_dataset("text", data_files=list(cfg.train_files), sample_by="document", split="train")
            return list(ds["text"])
        ds = load_dataset("json", data_files=list(cfg.train_files), split="train")
    except Exception as err:  # noqa: BLE001 -- datasets wraps parse errors in varying types
        cause = err.__cause__ or err
        raise DataError(f"data.train_files: cannot read {list(cfg.train_files)} as {fmt}: "
                        f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}") from None
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field: '{cfg.text_field}' not in the jsonl columns {ds.column_names}")
    texts = list(ds[cfg.text_field])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"data.text_field: '{cfg.text_field}' of row {bad} is {texts[bad]!r}, not text")
    return texts


def check_text_file(path: str, chunk: int = 1 << 20) -> None:
    """Fail on files that would train on garbage or break deep inside `datasets`: an empty file,
    a binary one (text never holds a NUL byte), or bytes that are not UTF-8."""
    if os.path.getsize(path) == 0:
        raise DataError(f"data.train_files: {path} is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(f"data.train_files: {path} looks binary (NUL byte at offset "
                                f"{offset + nul}); expected UTF-8 text or JSONL")
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                at = offset + err.start - (len(err.object) - len(block))
                raise DataError(f"data.train_files: {path} is not UTF-8 (byte 0x{err.object[err.start]:02x} "
                                f"at offset {at}); re-encode it, e.g. iconv -f latin1 -t utf-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"data.train_files: {path} is not UTF-8 (it ends inside a multi-byte "
                        "character)") from None


@dataclass
class Corpus:
    """Token ids split into non-overlapping (seq_len + 1)-token training and validation windows."""

    train: torch.Tensor  # [n_train, seq_len + 1] int64
    val: torch.Tensor  # [n_val, seq_len + 1]
    vocab_size: int


def build_corpus(cfg: DataConfig, tokenizer=None) -> Corpus:
    """Tokenize, cap at `max_bytes`, split the tail off for validation, cut into windows."""
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    text = "\n".join(read_documents(cfg))
    if cfg.max_bytes:
        text = text[: cfg.max_bytes]
    if not text.strip():
        raise DataError(f"data.train_files: {list(cfg.train_files)} hold no text (only empty documents)")
    ids = tokenizer.encode(text)
    n_val = int(len(ids) * cfg.val_fraction)
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    train, val = _windows(train_ids, cfg.seq_len), _windows(val_ids, cfg.seq_len)
    if len(train) == 0:
        raise DataError(
            f"data.seq_len: the training split has {len(train_ids)} tokens, fewer than one sequence "
            f"of seq_len+1={cfg.seq_len + 1}"
        )
    if cfg.val_fraction > 0 and len(val) < cfg.micro_batch_size:
        raise DataError(
            f"data.seq_len: the validation split ({cfg.val_fraction:g} of the corpus) has "
            f"{len(val_ids)} tokens: {len(val)} sequences of seq_len+1={cfg.seq_len + 1}, fewer than "
            f"one micro-batch of {cfg.micro_batch_size}; lower seq_len or raise data.val_fraction"
        )
    return Corpus(train=train, val=val, vocab_size=tokenizer.vocab_size)


def _windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = (len(ids) - 1) // seq_len
    if n <= 0:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(ids[idx].astype(np.int64))


class _EpochPermutation:
    """Position p of an endless stream over n items: epoch p // n reshuffled with (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty_like(positions)
        for epoch in np.unique(positions // self.n):
            if epoch != self._epoch:
                self._epoch = int(epoch)
                self._perm = np.random.default_rng([self.seed, self._epoch]).permutation(self.n)
            sel = positions // self.n == epoch
            out[sel] = self._perm[positions[sel] % self.n]
        return out


class TrainStream:
    """Group `group`'s disjoint shard; rank `group_rank` gets its slice of each micro-batch.

    Step t, micro-step m covers group positions [(t*A + m)*S*b, +S*b); rank r takes the r-th run
    of b sequences, the usual data-parallel split inside a group."""

    def __init__(self, corpus: Corpus, seed: int, group: int, groups: int,
                 group_rank: int, group_size: int, micro_batch: int, grad_accum: int) -> None:
        self.data = corpus.train[group::groups]
        if len(self.data) < group_size * micro_batch:
            raise DataError(
                f"data: group {group} has {len(self.data)} training sequences, fewer than one "
                f"micro-batch across its ranks ({group_size} x {micro_batch})"
            )
        self.order = _EpochPermutation(len(self.data), seed)
        self.rank, self.size = group_rank, group_size
        self.b, self.accum = micro_batch, grad_accum

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        start = ((step * self.accum + micro) * self.size + self.rank) * self.b
        return self.data[self.order(np.arange(start, start + self.b))]

    def sequences_per_step(self) -> int:
        return self.size * self.b * self.accum


class ExchangeStream:
    """The exchange batch e, identical on every group; rank r gets the r-th 1/S slice."""

    def __init__(self, corpus: Corpus, seed: int, batch: int, group_rank: int, group_size: int) -> None:
        if batch % group_size:
            raise DataError(f"data.exchange_batch_size={batch} is not divisible by {group_size} ranks per group")
        self.data = corpus.train
        self.order = _EpochPermutation(len(self.data), seed + EXCHANGE_STREAM_TAG)
        self.slice = batch // group_size
        self.batch, self.rank = batch, group_rank

    def batch_slice(self, e: int) -> torch.Tensor:
        start = e * self.batch + self.rank * self.slice
        return self.data[self.order(np.arange(start, start + self.slice))]


def val_micro_batches(corpus: Corpus, group_rank: int, group_size: int, micro_batch: int,
                      max_batches: int) -> list[torch.Tensor]:
    """The same validation windows on every group; ranks of a group take turns."""
    out = []
    for i in range(max_batches):
        start = (i * group_size + group_rank) * micro_batch
        if start + micro_batch > len(corpus.val):
            break
        out.append(corpus.val[start : start + micro_batch])
    return out

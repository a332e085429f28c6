"""Token shards on disk, read memory-mapped: the corpus format `codistill-ds tokenize` writes.

A corpus of tens of gigabytes cannot be tokenized on every rank at start-up, nor held in memory
(the in-memory path keeps int64 ids: 8 bytes per token, twice over while cutting windows). So
it is tokenized once into flat little-endian files of uint16 ids (uint32 when the vocabulary
does not fit) plus `index.json`, and each rank maps the files read-only: the operating system
pages in only the windows a batch touches, and every rank on a node shares the page cache.

    OUT/index.json          format, tokenizer, vocab_size, dtype, tokens, shards, sources, digest
    OUT/tokens_00000.bin    ids of the concatenated documents, in order
    OUT/tokens_00001.bin    ...

The token stream is the concatenation of the shards, exactly the ids the in-memory path would
hold for the same text (`data.build_corpus`), so `WindowView` cuts the same (seq_len + 1)-token
windows and the streams in data.py draw the same batches from either.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

INDEX = "index.json"
FORMAT = "codistill_ds.token_shards"
VERSION = 1


class ShardError(ValueError):
    """A shard directory that cannot be read as written by `codistill-ds tokenize`."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_shard_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))


@dataclass(frozen=True)
class ShardIndex:
    """The contents of index.json: what the tokens are and how to check they are the same."""

    tokenizer: str
    vocab_size: int
    dtype: str
    tokens: int
    shards: list[dict]
    """One {"file", "tokens", "sha256"} per shard, in stream order."""
    sources: list[dict]
    """One {"path", "bytes", "format"} per source file, in the order they were read."""
    digest: str
    """sha256 over dtype, vocabulary and every shard's sha256: names the token stream."""

    @staticmethod
    def read(directory: str) -> ShardIndex:
        path = os.path.join(directory, INDEX)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise ShardError(f"cannot read {path}: {err}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ShardError(f"{path} is not a {FORMAT} v{VERSION} index (format "
                             f"{meta.get('format')!r}, version {meta.get('version')!r})")
        return ShardIndex(**{k: meta[k] for k in ShardIndex.__dataclass_fields__})

    def write(self, directory: str) -> None:
        """Written last and atomically (rename): a directory with an index is complete."""
        path = os.path.join(directory, INDEX)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, **self.__dict__}, f, indent=1)
        os.replace(path + ".tmp", path)


def stream_digest(dtype: str, vocab_size: int, shard_sha256: list[str]) -> str:
    h = hashlib.sha256(f"{dtype}:{vocab_size}:".encode())
    for s in shard_sha256:
        h.update(s.encode())
    return h.hexdigest()


class TokenShards:
    """The concatenated token stream of a shard directory, read through short-lived memory maps."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.index = ShardIndex.read(directory)
        self.dtype = np.dtype(self.index.dtype).newbyteorder("<")
        sizes = [int(s["tokens"]) for s in self.index.shards]
        self.ends = np.cumsum(sizes, dtype=np.int64)
        if int(self.ends[-1] if sizes else 0) != self.index.tokens:
            raise ShardError(f"{directory}: shards hold {sum(sizes)} tokens, index says {self.index.tokens}")
        for shard, n in zip(self.index.shards, sizes):
            path = os.path.join(directory, shard["file"])
            have = os.path.getsize(path) if os.path.isfile(path) else None
            if have != n * self.dtype.itemsize:
                raise ShardError(f"{path}: expected {n * self.dtype.itemsize} bytes ({n} {self.index.dtype} "
                                 f"tokens), found {'no file' if have is None else f'{have} bytes'}")
        self.paths = [os.path.join(directory, s["file"]) for s in self.index.shards]

    def __len__(self) -> int:
        return self.index.tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64, across shard boundaries if need be.

        Each read maps only the pages it needs and unmaps them at once. A mapping kept open
        counts every page ever touched through it in the process's resident memory, and the
        kernel maps more than the page touched (fault-around, large page-cache folios: measured
        here, a whole-file mapping read at 1,000 random windows grew VmRSS by tens of MB), so
        a random-access epoch would end up holding the corpus in VmRSS. The pages stay in the
        page cache instead, shared by the ranks of a node and reclaimable. Cost: one mmap and
        munmap per window (tens of microseconds)."""
        out = np.empty(stop - start, dtype=np.int64)
        i, pos = int(np.searchsorted(self.ends, start, side="right")), start
        while pos < stop:
            lo = 0 if i == 0 else int(self.ends[i - 1])
            take = min(stop, int(self.ends[i])) - pos
            mapped = np.memmap(self.paths[i], dtype=self.dtype, mode="r", offset=(pos - lo) * self.dtype.itemsize,
                               shape=(take,))
            out[pos - start: pos - start + take] = mapped
            del mapped  # unmapped here, not at some later collection
            pos, i = pos + take, i + 1
        return out


class WindowView:
    """Windows w of tokens [first, first + n_tokens): tokens first + w*seq_len .. + seq_len + 1,
    the layout of the in-memory `data._windows`, selected by a range of window numbers.

    It answers exactly what data.py asks of `Corpus.train`/`Corpus.val`, with numpy's rule:
    a slice (`view[g::K]`, a group's shard) is another view and reads nothing; an integer or an
    index array reads those windows into an int64 tensor [n, seq_len + 1]."""

    def __init__(self, shards: TokenShards, first: int, n_tokens: int, seq_len: int,
                 rows: range | None = None) -> None:
        self.shards, self.first, self.n_tokens, self.seq_len = shards, first, n_tokens, seq_len
        self.rows = range(max(0, (n_tokens - 1) // seq_len)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.seq_len + 1)

    def __getitem__(self, key) -> WindowView | torch.Tensor:
        if isinstance(key, slice):
            return WindowView(self.shards, self.first, self.n_tokens, self.seq_len, self.rows[key])
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        idx = np.asarray(key)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"WindowView takes a slice, an int or a 1-D integer array, got {key!r}")
        out = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for j, i in enumerate(idx):
            start = self.first + self.rows[int(i)] * self.seq_len
            out[j] = self.shards.read(start, start + self.seq_len + 1)
        return torch.from_numpy(out)

    def digest(self) -> str:
        """Names the windows without reading them: the shards' digest and this selection."""
        r = self.rows
        text = f"{self.shards.index.digest}:{self.first}:{self.n_tokens}:{self.seq_len}:{r.start}:{r.stop}:{r.step}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

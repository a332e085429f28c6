"""`codistill-ds tokenize`: text or JSONL files into memory-mapped token shards, once.

    codistill-ds tokenize corpus/*.txt --out data/shards                       # byte tokenizer
    codistill-ds tokenize corpus.jsonl --out data/shards --tokenizer tok_dir/  # local HF tokenizer
    codistill-ds train --config my.yaml --set data.train_files=[data/shards]

The token stream is what `data.build_corpus` would tokenize for the same files: the documents
(a text file is one document, a JSONL row is one) joined by "\\n", read with universal newlines
like `datasets`' text loader. Nothing is held whole: text is read and encoded in pieces of about
`CHUNK_CHARS` characters cut at line ends, JSONL rows come through `datasets` streaming, and
ids go straight to shard files. With the byte tokenizer the shards hold exactly the in-memory
ids; a Hugging Face tokenizer sees each piece on its own, so ids can differ from one call on
the whole text at the few piece borders (one per ~1 MB, always after a newline).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from itertools import count

import numpy as np

from codistill_ds.data.shards import (
    ShardIndex,
    is_shard_dir,
    stream_digest,
    token_dtype,
)
from codistill_ds.data.sources import (
    DataError,
    check_text_file,
    load_local_dataset,
    read_error,
    resolve_format,
)
from codistill_ds.data.tokenizers import load_tokenizer

SHARD_TOKENS = 1 << 28
"""Tokens per shard file by default: 512 MiB of uint16 ids, a few hundred files for 100 GB."""
CHUNK_CHARS = 1 << 20
"""Characters encoded per tokenizer call: bounds memory, keeps calls large enough to be fast."""


def text_pieces(files: list[str], fmt: str, text_field: str) -> Iterator[str]:
    """Pieces whose concatenation is "\\n".join(documents), each ending at a line end."""
    if fmt == "text":
        for n, path in enumerate(files):
            if n:
                yield "\n"
            with open(path, encoding="utf-8") as f:  # universal newlines, as datasets' text loader
                while block := f.read(CHUNK_CHARS):
                    yield block + f.readline()
        return
    for n, text in enumerate(jsonl_documents(files, text_field)):
        yield ("\n" if n else "") + text


def jsonl_documents(files: list[str], text_field: str) -> Iterator[str]:
    """The `text_field` of every row, through `datasets` streaming (rows are never all loaded)."""
    rows = iter(load_local_dataset(files, "jsonl", streaming=True))
    for row_no in count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 -- a parse error surfaces while streaming
            raise read_error(files, "jsonl", err) from None
        text = row.get(text_field)
        if not isinstance(text, str):
            what = "missing" if text_field not in row else f"{text!r}, not text"
            raise DataError(f"data.text_field: '{text_field}' of row {row_no} is {what} "
                            f"(columns: {sorted(row)})")
        yield text


def encoded_chunks(pieces: Iterable[str], tokenizer, chunk_chars: int = CHUNK_CHARS) -> Iterator[np.ndarray]:
    """Encode the concatenated pieces about `chunk_chars` at a time, cutting after a newline."""
    buf: list[str] = []
    size = 0
    for piece in pieces:
        buf.append(piece)
        size += len(piece)
        if size < chunk_chars:
            continue
        text = "".join(buf)
        cut = text.rfind("\n") + 1 or len(text)
        yield tokenizer.encode(text[:cut])
        buf, size = [text[cut:]], len(text) - cut
    if size:
        yield tokenizer.encode("".join(buf))


class ShardWriter:
    """Appends ids to tokens_NNNNN.bin files of at most `shard_tokens` ids each."""

    def __init__(self, out_dir: str, vocab_size: int, shard_tokens: int) -> None:
        self.out_dir, self.vocab_size, self.limit = out_dir, vocab_size, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict] = []
        self._file, self._hash, self._count = None, None, 0

    def add(self, ids: np.ndarray) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {self.vocab_size}")
        ids = ids.astype(self.dtype)
        while len(ids):
            if self._file is None:
                self._open()
            take = min(len(ids), self.limit - self._count)
            data = ids[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            ids = ids[take:]
            if self._count == self.limit:
                self._close()

    def _open(self) -> None:
        name = f"tokens_{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})
        self._file = open(os.path.join(self.out_dir, name), "wb")  # noqa: SIM115 -- open across add() calls
        self._hash, self._count = hashlib.sha256(), 0

    def _close(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards


def tokenize_files(files: list[str], out_dir: str, tokenizer_spec: str = "byte", fmt: str = "auto",
                   text_field: str = "text", shard_tokens: int = SHARD_TOKENS) -> ShardIndex:
    """Write the shards and index.json of `files` into `out_dir` (which must hold no index)."""
    if not files:
        raise DataError("tokenize: no input files")
    if shard_tokens <= 0:
        raise DataError(f"tokenize: --shard-tokens must be > 0, got {shard_tokens}")
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"tokenize: no such file: {path}")
        check_text_file(path)
    if is_shard_dir(out_dir):
        raise DataError(f"tokenize: {out_dir} already holds token shards; choose a new --out directory")
    fmt = resolve_format(fmt, files)
    tokenizer = load_tokenizer(tokenizer_spec)
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, tokenizer.vocab_size, shard_tokens)
    for ids in encoded_chunks(text_pieces(files, fmt, text_field), tokenizer):
        writer.add(ids)
    shards = writer.finish()
    total = sum(s["tokens"] for s in shards)
    if total == 0:
        raise DataError(f"tokenize: {files} hold no text")
    dtype = writer.dtype.name  # little-endian on disk whatever the machine (shards.token_dtype)
    index = ShardIndex(
        tokenizer=tokenizer_spec, vocab_size=tokenizer.vocab_size, dtype=dtype, tokens=total, shards=shards,
        sources=[{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "format": fmt} for p in files],
        digest=stream_digest(dtype, tokenizer.vocab_size, [s["sha256"] for s in shards]))
    index.write(out_dir)
    return index

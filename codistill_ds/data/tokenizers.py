"""Tokenizers that need no download: UTF-8 bytes (vocabulary 256), or a local Hugging Face folder."""

from __future__ import annotations

import numpy as np


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

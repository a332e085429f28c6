"""Tokenizers that need no download: UTF-8 bytes (vocabulary 256), or a local Hugging Face folder."""

from __future__ import annotations

import os

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any of these in a folder means it has a Hugging Face tokenizer."""


def resolve_tokenizer(spec: str, model_path: str | None = None) -> str:
    """The concrete tokenizer of `data.tokenizer`: "auto" is the model folder when it holds a
    tokenizer (a pretrained model must read the ids it was trained on), else "byte"; anything
    else is returned as given."""
    if spec != "auto":
        return spec
    if model_path and os.path.isdir(model_path) and any(
            os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
        return model_path
    return "byte"


def load_tokenizer(spec: str, model_path: str | None = None):
    """`byte`, `auto` (see `resolve_tokenizer`) or a path to a local tokenizer directory."""
    spec = resolve_tokenizer(spec, model_path)
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)

"""Compressing per-token predictions for the codistillation exchange.

In codistillation (Anil et al. 2018, arXiv 1804.03235) replicas swap predictions on a shared
exchange batch rather than weights. A full-vocabulary fp32 prediction costs 4*V bytes per token
(half a megabyte at V = 128k), so the exchange would rival a gradient all-reduce. Most of a
language model's probability mass sits on a handful of tokens, so each replica sends only its
top-k entries (in a 16-bit wire dtype) plus their int32 vocabulary ids; `losses.py` folds the
mass that was not sent into one "tail" bucket so the loss remains a true divergence.

Values and ids travel as ONE contiguous uint8 buffer: a single collective then carries both, and
backends whose collectives lack bf16 in some ops (gloo) still move the bytes bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("logprobs", "logits")

_WIRE_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_INDEX_DTYPE = torch.int32
_INDEX_BYTES = 4


@dataclass
class CompressedLogits:
    """One replica's predictions on the exchange batch, as they travel between replicas.

    `indices` is None for a full-vocabulary payload (k == V, natural vocabulary order); otherwise
    it holds int32 ids sorted by descending value, so column 0 is the replica's top-1 guess.
    int32 halves the id bytes relative to int64 and covers every real vocabulary.
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    kind: str

    def __post_init__(self) -> None:
        # Reject malformed payloads here, where the cause is obvious, rather than as a shape
        # error deep inside a loss or a silently wrong byte count on the wire.
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.values.dim() != 2:
            raise ValueError(f"values must be [N, k], got shape {tuple(self.values.shape)}")
        if self.values.dtype not in _WIRE_DTYPES.values():
            raise ValueError(f"values dtype {self.values.dtype} is not a wire dtype "
                             f"({', '.join(_WIRE_DTYPES)})")
        if self.indices is not None:
            if self.indices.shape != self.values.shape:
                raise ValueError(f"indices shape {tuple(self.indices.shape)} != values shape "
                                 f"{tuple(self.values.shape)}")
            if self.indices.dtype != _INDEX_DTYPE:
                raise ValueError(f"indices must be int32, got {self.indices.dtype}")

    @property
    def k(self) -> int:
        """Entries sent per token (V for a full-vocabulary payload)."""
        return int(self.values.shape[1])

    @property
    def full_vocab(self) -> bool:
        """True when every vocabulary entry was sent, so no tail bucket is needed."""
        return self.indices is None

    def top1(self) -> torch.Tensor:
        """Predicted token per position, [N] int64, for agreement metrics.

        Both kinds are monotone in the logit, so the largest sent value is the argmax."""
        if self.indices is None:
            return self.values.argmax(dim=-1)
        return self.indices[:, 0].long()

    def num_tokens(self) -> int:
        """Token positions covered (rows)."""
        return int(self.values.shape[0])


def wire_dtype(name: str) -> torch.dtype:
    """Map a config string to the wire dtype, failing loudly on typos at config time."""
    try:
        return _WIRE_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown wire dtype {name!r}; valid names: {', '.join(_WIRE_DTYPES)}") from None


def _check_wire_dtype(dtype: torch.dtype) -> None:
    if dtype not in _WIRE_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not a wire dtype; use one of "
                         f"{[str(d) for d in _WIRE_DTYPES.values()]}")


def compress(logits: torch.Tensor, topk: int, dtype: torch.dtype, kind: str,
             temperature: float) -> CompressedLogits:
    """Reduce [N, V] logits to the payload a replica sends its peers.

    `topk` of 0 or >= V sends the full vocabulary. Log-probabilities are taken at temperature T
    in float32 before the cast, so the wire rounding applies to the final numbers rather than
    being amplified by a later softmax. Runs detached: the peers' predictions are constants to
    the receiving replica, and no graph should be kept alive for them.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0 (0 = full vocabulary), got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_wire_dtype(dtype)
    vocab = logits.shape[1]
    full = topk == 0 or topk >= vocab
    with torch.no_grad():
        z = logits.detach().float()
        if full:
            source = torch.log_softmax(z / temperature, dim=-1) if kind == "logprobs" else z
            return CompressedLogits(source.to(dtype).contiguous(), None, kind)
        # T > 0 keeps log_softmax(z / T) monotone in z, so ranking the raw logits suffices.
        top, idx = torch.topk(z, topk, dim=-1, largest=True, sorted=True)
        if kind == "logprobs":
            # z_i / T - logsumexp(z / T) at the k ids only: no second [N, V] float32 buffer.
            top = top / temperature - torch.logsumexp(z / temperature, dim=-1, keepdim=True)
        return CompressedLogits(top.to(dtype).contiguous(), idx.to(_INDEX_DTYPE).contiguous(), kind)


def payload_bytes(num_tokens: int, k: int, dtype: torch.dtype, full_vocab: bool) -> int:
    """Size of `pack`'s buffer, known in advance so receivers can allocate before the collective."""
    if num_tokens < 0 or k < 0:
        raise ValueError(f"num_tokens and k must be >= 0, got {num_tokens}, {k}")
    _check_wire_dtype(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_tokens * k * (itemsize + (0 if full_vocab else _INDEX_BYTES))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Reinterpretation, not conversion: .view(uint8) keeps every bit, which is the point.
    return t.contiguous().reshape(-1).view(torch.uint8)


def pack(c: CompressedLogits) -> torch.Tensor:
    """Serialize to one contiguous 1-D uint8 tensor: the values' bytes, then the indices' bytes."""
    parts = [_as_bytes(c.values)]
    if c.indices is not None:
        parts.append(_as_bytes(c.indices))
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _from_bytes(chunk: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    # A byte slice can only be viewed as a wider dtype when its offset is a multiple of that
    # width (e.g. int32 ids after an odd number of bf16 values); copy only in that case.
    itemsize = torch.empty((), dtype=dtype).element_size()
    if chunk.storage_offset() % itemsize != 0:
        chunk = chunk.clone()
    return chunk.view(dtype).view(shape)


def unpack(buf: torch.Tensor, num_tokens: int, k: int, dtype: torch.dtype, full_vocab: bool,
           kind: str) -> CompressedLogits:
    """Exact inverse of `pack`, given the metadata both sides already agree on.

    The returned tensors may alias `buf` (no copy when alignment allows); clone them if the
    receive buffer will be reused.
    """
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"buf must be a 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    expected = payload_bytes(num_tokens, k, dtype, full_vocab)
    if buf.numel() != expected:
        raise ValueError(f"buf has {buf.numel()} bytes, expected {expected} for "
                         f"num_tokens={num_tokens}, k={k}, dtype={dtype}, full_vocab={full_vocab}")
    buf = buf.contiguous()
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_value_bytes = num_tokens * k * itemsize
    values = _from_bytes(buf[:n_value_bytes], dtype, (num_tokens, k))
    indices = None
    if not full_vocab:
        indices = _from_bytes(buf[n_value_bytes:], _INDEX_DTYPE, (num_tokens, k))
    return CompressedLogits(values, indices, kind)

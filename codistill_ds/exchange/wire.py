"""Compressing per-token predictions for the codistillation exchange, and their wire format.

In codistillation (Anil et al. 2018, arXiv 1804.03235) replicas swap predictions on a shared
exchange batch rather than weights. A full-vocabulary fp32 prediction costs 4*V bytes per token
(half a megabyte at V = 128k), so the exchange would rival a gradient all-reduce. Most of a
language model's probability mass sits on a handful of tokens, so each replica sends only its
top-k entries plus their vocabulary ids; `losses.py` folds the mass that was not sent into one
"tail" bucket so the loss remains a true divergence (down to k = 1: top-1 plus its exact rest).

Two objects, two jobs:

- `CompressedLogits` is the *content*: values in a float dtype the losses read, int32 ids. It
  already carries every rounding the wire imposes (fp8 values are stored dequantized), so the
  sender's copy and every receiver's copy hold the same numbers.
- `WireFormat` is the *bytes*: k, value dtype, index dtype, kind, and whether a per-token scale
  travels. `pack`/`unpack` are an exact, lossless codec of what `compress` produced, and
  `payload_bytes(num_tokens)` is known in advance so receivers allocate before the collective and
  `plan` can state the bytes. Values, ids and scales travel as ONE contiguous uint8 buffer: a
  single collective carries them, bit-exactly, over backends that lack some dtypes (gloo).

Wire choices and why:
- ids: uint16 when the vocabulary fits (V <= 65,536: every Llama-2/GPT-2-sized tokenizer), else
  int32; 2 bytes instead of 4 per kept entry. In memory ids stay int32 (uint16 has few kernels).
- values: bf16, fp16, fp32, or fp8 e4m3 with one power-of-two scale per token, sent as its int8
  exponent (1 byte; the E8M0 block scale of the OCP Microscaling formats, with a token's k values
  as the block). A power of two makes dequantization exact in bf16, so re-packing a dequantized
  payload gives back the same numbers. e4m3 keeps 3 mantissa bits: each value within 2^-4
  relative of the fp32 one (6.25%), the largest magnitude of a token mapped into [224, 448].
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

KINDS = ("logprobs", "logits", "samples")
"""logprobs: log-softmax at temperature T; logits: raw (for mse); samples: ids drawn from the
teacher with their log-probs (`sampling.py`), the unbiased alternative to top-k."""

VALUE_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}
"""Wire value dtypes by config name."""

INDEX_DTYPES = ("auto", "uint16", "int32")
"""Config choices for ids: auto = uint16 when the vocabulary fits, else int32."""

UINT16_VOCAB = 65_536
"""Largest vocabulary whose ids fit uint16 (0..65,535)."""

_INDEX_BYTES = {"uint16": 2, "int32": 4}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_SCALE_BYTES = 1  # int8 exponent of the per-token power-of-two scale
_EXP_RANGE = (-100, 120)  # keeps 2**e and 2**-e normal float32 numbers
_CARRIERS = (torch.bfloat16, torch.float16, torch.float32)

if sys.byteorder != "little":  # the uint16 id codec keeps the low half of each int32
    raise ImportError("codistill_ds.exchange.wire assumes a little-endian machine")


def wire_dtype(name: str) -> torch.dtype:
    """Map a config string to the wire value dtype, failing loudly on typos at config time."""
    try:
        return VALUE_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown wire dtype {name!r}; valid names: {', '.join(VALUE_DTYPES)}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in VALUE_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not a wire dtype; use one of {', '.join(VALUE_DTYPES)}")


def carrier_dtype(value_dtype: str) -> torch.dtype:
    """The in-memory dtype of values sent as `value_dtype`: fp8 lives dequantized in bf16 (exact
    for a power-of-two scale), the others as themselves."""
    return torch.bfloat16 if value_dtype == "fp8" else wire_dtype(value_dtype)


def choose_index_dtype(index_dtype: str, vocab: int) -> str:
    """Resolve "auto" against the vocabulary; refuse uint16 ids that cannot hold every id."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index dtype must be one of {', '.join(INDEX_DTYPES)}, got {index_dtype!r}")
    if index_dtype == "auto":
        return "uint16" if vocab <= UINT16_VOCAB else "int32"
    if index_dtype == "uint16" and vocab > UINT16_VOCAB:
        raise ValueError(f"uint16 ids hold a vocabulary of at most {UINT16_VOCAB:,}, got {vocab:,}")
    return index_dtype


@dataclass(frozen=True)
class WireFormat:
    """How one token's prediction is laid out on the wire; independent of the token count.

    Buffer layout for N tokens: N*k values, then N*k ids (none for the full vocabulary), then N
    int8 scale exponents (fp8 only)."""

    k: int
    """Entries per token: top-k, samples drawn, or V for the full vocabulary."""
    value_dtype: str
    """"bf16" | "fp16" | "fp32" | "fp8" (e4m3 with a per-token scale)."""
    index_dtype: str | None
    """"uint16" | "int32"; None for the full vocabulary (natural order, no ids sent)."""
    kind: str
    """"logprobs" | "logits" | "samples" (see KINDS)."""
    vocab: int | None = field(default=None, compare=False)
    """Vocabulary the ids index (the teacher's V); None when unknown. Not on the wire: the
    receiver unpacks with its own format, so this is its own V, which `losses.py` compares with
    the student logits' width (a tensor-parallel vocabulary slice [N, V/T] is refused)."""

    def __post_init__(self) -> None:
        if self.vocab is not None and self.vocab < 1:
            raise ValueError(f"vocab must be >= 1 or None, got {self.vocab}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        wire_dtype(self.value_dtype)
        if self.index_dtype is not None and self.index_dtype not in _INDEX_BYTES:
            raise ValueError(f"index dtype must be uint16, int32 or None, got {self.index_dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "samples" and self.index_dtype is None:
            raise ValueError("a samples payload needs ids (index_dtype uint16 or int32)")

    @classmethod
    def choose(cls, topk: int, vocab: int, value_dtype: str, index_dtype: str = "auto",
               kind: str = "logprobs") -> WireFormat:
        """The format a config asks for: topk 0 (or >= vocab) sends the full vocabulary."""
        if topk < 0 or vocab < 1:
            raise ValueError(f"topk must be >= 0 and vocab >= 1, got topk={topk}, vocab={vocab}")
        if topk == 0 or topk >= vocab:
            return cls(vocab, value_dtype, None, kind, vocab)
        return cls(topk, value_dtype, choose_index_dtype(index_dtype, vocab), kind, vocab)

    @property
    def full_vocab(self) -> bool:
        return self.index_dtype is None

    @property
    def scale(self) -> bool:
        """Whether a per-token scale travels (fp8 values)."""
        return self.value_dtype == "fp8"

    @property
    def value_bytes(self) -> int:
        return torch.empty((), dtype=wire_dtype(self.value_dtype)).element_size()

    @property
    def index_bytes(self) -> int:
        return 0 if self.index_dtype is None else _INDEX_BYTES[self.index_dtype]

    @property
    def bytes_per_token(self) -> int:
        """k (value + id bytes) + the scale byte: what one token position costs on the wire."""
        return self.k * (self.value_bytes + self.index_bytes) + (_SCALE_BYTES if self.scale else 0)

    def payload_bytes(self, num_tokens: int) -> int:
        """Size of `pack`'s buffer for `num_tokens` positions."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens * self.bytes_per_token

    def describe(self) -> str:
        """E.g. "top-32, bf16 values + uint16 ids" (for tables and logs)."""
        what = "full vocab" if self.full_vocab else (
            f"{self.k} samples" if self.kind == "samples" else f"top-{self.k}")
        ids = "" if self.full_vocab else f" + {self.index_dtype} ids"
        scale = " + int8 scale exponent per token" if self.scale else ""
        return f"{what}, {self.value_dtype} values{ids}{scale}"

    def pack(self, c: CompressedLogits) -> torch.Tensor:
        """Serialize to one contiguous 1-D uint8 tensor: values, ids, scale exponents."""
        self._check_content(c)
        if self.scale:
            codes, exps = quantize_fp8(c.values)
            parts = [_as_bytes(codes)]
        else:
            parts = [_as_bytes(c.values.to(wire_dtype(self.value_dtype)))]
        if self.index_dtype == "uint16":
            # low half of each little-endian int32: ids < 65,536 by `choose`; int16 views work
            # on every device, where uint16 kernels do not.
            parts.append(_as_bytes(c.indices.contiguous().view(torch.int16)[..., 0::2]))
        elif self.index_dtype == "int32":
            parts.append(_as_bytes(c.indices))
        if self.scale:
            parts.append(_as_bytes(exps))
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def unpack(self, buf: torch.Tensor, num_tokens: int) -> CompressedLogits:
        """Exact inverse of `pack`. The result may alias `buf` where alignment allows; clone
        it if the receive buffer will be reused."""
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError(f"buf must be a 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
        expected = self.payload_bytes(num_tokens)
        if buf.numel() != expected:
            raise ValueError(f"buf has {buf.numel()} bytes, expected {expected} for "
                             f"num_tokens={num_tokens} in format {self}")
        shape, n = (num_tokens, self.k), num_tokens * self.k
        buf = buf.contiguous()
        end = n * self.value_bytes
        values = _from_bytes(buf[:end], wire_dtype(self.value_dtype), shape)
        indices = None
        if self.index_dtype is not None:
            chunk = buf[end:end + n * self.index_bytes]
            end += n * self.index_bytes
            if self.index_dtype == "uint16":
                indices = _from_bytes(chunk, torch.int16, shape).to(torch.int32) & 0xFFFF
            else:
                indices = _from_bytes(chunk, torch.int32, shape)
        if self.scale:
            values = dequantize_fp8(values, _from_bytes(buf[end:], torch.int8, (num_tokens,)))
        return CompressedLogits(values, indices, self.kind, self)

    def _check_content(self, c: CompressedLogits) -> None:
        if c.k != self.k or c.kind != self.kind or c.full_vocab != self.full_vocab:
            raise ValueError(f"payload (k={c.k}, kind={c.kind}, full_vocab={c.full_vocab}) does "
                             f"not match wire format {self}")


@dataclass
class CompressedLogits:
    """One replica's predictions on the exchange batch, as every side of the wire sees them.

    `indices` is None for a full-vocabulary payload (k == V, natural vocabulary order); otherwise
    it holds int32 ids, sorted by descending value for top-k (column 0 is the top-1 guess) or in
    draw order for samples. `fmt` is the wire format it was made for (None: the values' own dtype
    and int32 ids, the lossless default)."""

    values: torch.Tensor
    indices: torch.Tensor | None
    kind: str
    fmt: WireFormat | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Reject malformed payloads here, where the cause is obvious, rather than as a shape
        # error deep inside a loss or a silently wrong byte count on the wire.
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.values.dim() != 2:
            raise ValueError(f"values must be [N, k], got shape {tuple(self.values.shape)}")
        if self.values.dtype not in _CARRIERS:
            raise ValueError(f"values dtype {self.values.dtype} is not bf16, fp16 or fp32 "
                             "(fp8 payloads are held dequantized in bf16)")
        if self.indices is not None:
            if self.indices.shape != self.values.shape:
                raise ValueError(f"indices shape {tuple(self.indices.shape)} != values shape "
                                 f"{tuple(self.values.shape)}")
            if self.indices.dtype != torch.int32:
                raise ValueError(f"indices must be int32, got {self.indices.dtype}")
        if self.fmt is not None:
            self.fmt._check_content(self)
            if self.values.dtype != carrier_dtype(self.fmt.value_dtype):
                raise ValueError(f"values dtype {self.values.dtype} does not carry "
                                 f"{self.fmt.value_dtype} values")

    @property
    def k(self) -> int:
        """Entries sent per token (V for a full-vocabulary payload)."""
        return int(self.values.shape[1])

    @property
    def full_vocab(self) -> bool:
        """True when every vocabulary entry was sent, so no tail bucket is needed."""
        return self.indices is None

    def wire_format(self) -> WireFormat:
        """The format `pack` uses: the one compress chose, else the lossless default."""
        if self.fmt is not None:
            return self.fmt
        index = None if self.indices is None else "int32"
        return WireFormat(self.k, _dtype_name(self.values.dtype), index, self.kind)

    def top1(self) -> torch.Tensor:
        """Predicted token per position, [N] int64, for agreement metrics.

        Every kind is monotone in the logit, so the largest sent value marks the argmax (for
        samples: the most probable id drawn)."""
        best = self.values.argmax(dim=-1, keepdim=True)
        if self.indices is None:
            return best.squeeze(-1)
        return self.indices.gather(-1, best).squeeze(-1).long()

    def num_tokens(self) -> int:
        """Token positions covered (rows)."""
        return int(self.values.shape[0])

    def rows(self, start: int, stop: int) -> CompressedLogits:
        """Rows [start, stop) as an independent copy, wire format kept."""
        idx = None if self.indices is None else self.indices[start:stop].clone()
        return CompressedLogits(self.values[start:stop].clone(), idx, self.kind, self.fmt)


def quantize_fp8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, k] values -> (float8_e4m3fn codes, int8 exponents e) with values ~= codes * 2**e.

    e is the smallest power of two that brings the token's largest finite magnitude to <= 448;
    from frexp(amax) = m * 2**a: e = a - 9 when m <= 0.875 (448 = 0.875 * 2**9), else a - 8.
    Infinite values saturate to +-448 * 2**e, NaN stays NaN (the health check drops NaN peers)."""
    v = values.float()
    amax = torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v)).amax(dim=-1)
    mant, ex = torch.frexp(amax)
    e = torch.where(amax > 0, ex - 9 + (mant > 0.875).int(), torch.zeros_like(ex))
    e = e.clamp(*_EXP_RANGE)
    codes = (v * torch.exp2(-e.float()).unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX)
    return codes.to(torch.float8_e4m3fn), e.to(torch.int8)


def dequantize_fp8(codes: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """codes * 2**e in bf16: exact, since a code has 4 significant bits and the scale is 2**e."""
    return (codes.float() * torch.exp2(exps.float()).unsqueeze(-1)).to(torch.bfloat16)


def check_whole_vocabulary(x: object, what: str) -> None:
    """Refuse a tensor that holds only a slice of the vocabulary where the whole one is needed.

    Under tensor parallelism a rank's logits are [N, V/T]; top-k, softmax or a loss over them
    is silently wrong (it normalizes over the slice). Caught here: a `vocab_parallel.VocabSlice`,
    the local tensor it wraps (tagged at construction), and a DTensor whose last dimension is
    sharded. Such slices go to `codistill_ds.vocab_parallel`, which computes the same numbers
    with collectives over the tensor-parallel group."""
    if getattr(x, "_codistill_vocab_slice", None) is not None:
        raise TypeError(f"{what} got a tensor-parallel vocabulary slice ({type(x).__name__}); "
                        "it needs the whole vocabulary: use codistill_ds.vocab_parallel")
    local = getattr(x, "_local_tensor", None)  # DTensor, duck-typed (no import of torch.distributed)
    if isinstance(x, torch.Tensor) and isinstance(local, torch.Tensor) and x.dim() > 0 \
            and local.shape[-1] != x.shape[-1]:
        raise TypeError(f"{what} got a DTensor sharded along the vocabulary (local "
                        f"{tuple(local.shape)} of {tuple(x.shape)}): use codistill_ds.vocab_parallel")


def compress(logits: torch.Tensor, topk: int, dtype: torch.dtype, kind: str,
             temperature: float, index_dtype: str = "auto") -> CompressedLogits:
    """Reduce [N, V] logits to the payload a replica sends its peers.

    `topk` of 0 or >= V sends the full vocabulary. Log-probabilities are taken at temperature T
    in float32 before the wire rounding (one rounding, of the final numbers, not amplified by a
    later softmax). Runs detached: the peers' predictions are constants to the receiving
    replica, and no graph should be kept alive for them."""
    check_whole_vocabulary(logits, "compress")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if kind not in ("logprobs", "logits"):
        raise ValueError(f"kind must be 'logprobs' or 'logits', got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    fmt = WireFormat.choose(topk, logits.shape[1], _dtype_name(dtype), index_dtype, kind)
    with torch.no_grad():
        z = logits.detach().float()
        if fmt.full_vocab:
            values = torch.log_softmax(z / temperature, dim=-1) if kind == "logprobs" else z
            return CompressedLogits(to_wire_values(values, fmt.value_dtype), None, kind, fmt)
        # T > 0 keeps log_softmax(z / T) monotone in z, so ranking the raw logits suffices.
        top, idx = torch.topk(z, fmt.k, dim=-1, largest=True, sorted=True)
        if kind == "logprobs":
            # z_i / T - logsumexp(z / T) at the k ids only: no second [N, V] float32 buffer.
            top = top / temperature - torch.logsumexp(z / temperature, dim=-1, keepdim=True)
        return CompressedLogits(to_wire_values(top, fmt.value_dtype),
                                idx.to(torch.int32).contiguous(), kind, fmt)


def to_wire_values(values: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """float32 [N, k] -> the in-memory carrier, with exactly the wire's rounding applied."""
    if value_dtype == "fp8":
        return dequantize_fp8(*quantize_fp8(values)).contiguous()
    return values.to(wire_dtype(value_dtype)).contiguous()


def pack(c: CompressedLogits) -> torch.Tensor:
    """`c`'s own wire format packed (see `WireFormat.pack`)."""
    return c.wire_format().pack(c)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Reinterpretation, not conversion: .view(uint8) keeps every bit, which is the point.
    # reshape and contiguous() keep the stride of a size-1 view (one token at k = 1: the low half
    # of an int32 id, stride 2), which .view(uint8) refuses; such a tensor is copied.
    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:
        flat = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device).copy_(flat)
    return flat.view(torch.uint8)


def _from_bytes(chunk: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    # A byte slice can only be viewed as a wider dtype when its offset is a multiple of that
    # width (e.g. int32 ids after an odd number of bf16 values); copy only in that case.
    itemsize = torch.empty((), dtype=dtype).element_size()
    if chunk.storage_offset() % itemsize != 0:
        chunk = chunk.clone()
    return chunk.view(dtype).view(shape)

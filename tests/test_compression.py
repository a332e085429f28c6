"""Tests for codistill_ds.compression: the exchange payload must survive the wire bit-exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codistill_ds.compression import (
    CompressedLogits,
    compress,
    pack,
    payload_bytes,
    unpack,
    wire_dtype,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _logits(n: int, v: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3.0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor, so equality compares bits (NaN payloads, -0.0 included)."""
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(int_dtype)


def _assert_bit_exact(a: CompressedLogits, b: CompressedLogits) -> None:
    assert a.kind == b.kind
    assert a.values.dtype == b.values.dtype and a.values.shape == b.values.shape
    assert torch.equal(_bits(a.values), _bits(b.values))
    if a.indices is None:
        assert b.indices is None
    else:
        assert b.indices is not None and b.indices.dtype == torch.int32
        assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [0, 5, 37])
@pytest.mark.parametrize("kind", ["logprobs", "logits"])
def test_pack_unpack_round_trip_bit_exact(dtype: torch.dtype, topk: int, kind: str) -> None:
    n, v = 7, 37  # odd sizes: bf16/fp16 value bytes then end off a 4-byte boundary
    c = compress(_logits(n, v), topk, dtype, kind, temperature=1.5)
    full = c.indices is None
    assert full == (topk == 0 or topk >= v)
    buf = pack(c)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.is_contiguous()
    assert buf.numel() == payload_bytes(n, c.k, dtype, full)
    _assert_bit_exact(c, unpack(buf, n, c.k, dtype, full, kind))


def test_round_trip_keeps_special_values() -> None:
    values = torch.tensor([[float("inf"), -0.0, float("-inf")],
                           [1e-40, 65504.0, float("nan")]], dtype=torch.float32)
    idx = torch.tensor([[3, 1, 0], [2, 9, 4]], dtype=torch.int32)
    for dtype in DTYPES:
        c = CompressedLogits(values.to(dtype), idx, "logits")
        _assert_bit_exact(c, unpack(pack(c), 2, 3, dtype, False, "logits"))


def test_unpack_from_misaligned_slice() -> None:
    """A receive buffer may be a slice of a larger gather buffer at any byte offset."""
    c = compress(_logits(3, 20), 3, torch.bfloat16, "logprobs", 1.0)
    buf = pack(c)
    big = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])
    _assert_bit_exact(c, unpack(big[1:], 3, 3, torch.bfloat16, False, "logprobs"))


@pytest.mark.parametrize("dtype,itemsize", [(torch.bfloat16, 2), (torch.float16, 2),
                                            (torch.float32, 4)])
def test_payload_bytes_formula(dtype: torch.dtype, itemsize: int) -> None:
    assert payload_bytes(10, 4, dtype, full_vocab=False) == 10 * 4 * (itemsize + 4)
    assert payload_bytes(10, 50, dtype, full_vocab=True) == 10 * 50 * itemsize
    assert payload_bytes(0, 4, dtype, full_vocab=False) == 0


def test_topk_indices_are_true_topk_descending() -> None:
    z = _logits(16, 100, seed=3)
    c = compress(z, 8, torch.float32, "logits", 1.0)
    assert c.indices is not None and c.indices.dtype == torch.int32
    order = torch.argsort(z, dim=-1, descending=True)[:, :8]
    assert torch.equal(c.indices.long(), order)
    assert torch.equal(c.values, z.gather(-1, order))
    assert torch.all(c.values[:, :-1] >= c.values[:, 1:])
    # Every unsent logit is below every sent one.
    rest = z.scatter(-1, order, float("-inf")).amax(-1)
    assert torch.all(rest < c.values[:, -1])
    assert torch.equal(c.top1(), z.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_logprob_values_match_log_softmax(temperature: float) -> None:
    z = _logits(9, 50, seed=4)
    ref = torch.log_softmax(z.double() / temperature, dim=-1)
    c = compress(z, 6, torch.float32, "logprobs", temperature)
    assert c.indices is not None
    torch.testing.assert_close(c.values.double(), ref.gather(-1, c.indices.long()),
                               rtol=1e-6, atol=1e-6)
    full = compress(z, 0, torch.float32, "logprobs", temperature)
    assert full.indices is None and full.k == 50
    torch.testing.assert_close(full.values.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(full.top1(), z.argmax(-1))


def test_compress_is_detached_and_no_grad() -> None:
    z = _logits(4, 10).requires_grad_(True)
    c = compress(z, 3, torch.bfloat16, "logprobs", 1.0)
    assert not c.values.requires_grad and c.values.grad_fn is None
    assert c.num_tokens() == 4


def test_topk_at_least_vocab_is_full() -> None:
    c = compress(_logits(2, 10), 10, torch.float16, "logits", 1.0)
    assert c.indices is None and c.values.shape == (2, 10) and c.values.dtype == torch.float16


def test_wire_dtype_names() -> None:
    assert wire_dtype("bf16") is torch.bfloat16
    assert wire_dtype("fp16") is torch.float16
    assert wire_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="bf16.*fp16.*fp32"):
        wire_dtype("float8")


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="kind"):
        compress(_logits(2, 5), 2, torch.float32, "probs", 1.0)
    with pytest.raises(ValueError, match="wire dtype"):
        compress(_logits(2, 5), 2, torch.float64, "logits", 1.0)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 2, 2, torch.float32, False, "logits")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 9), v=st.integers(1, 40), k=st.integers(0, 45),
       dtype=st.sampled_from(DTYPES), kind=st.sampled_from(["logprobs", "logits"]),
       temperature=st.floats(0.25, 4.0), seed=st.integers(0, 2**16))
def test_round_trip_property(n: int, v: int, k: int, dtype: torch.dtype, kind: str,
                             temperature: float, seed: int) -> None:
    c = compress(_logits(n, v, seed), k, dtype, kind, temperature)
    full = c.indices is None
    expected_k = v if (k == 0 or k >= v) else k
    assert c.k == expected_k and c.num_tokens() == n
    buf = pack(c)
    assert buf.numel() == payload_bytes(n, c.k, dtype, full)
    _assert_bit_exact(c, unpack(buf, n, c.k, dtype, full, kind))

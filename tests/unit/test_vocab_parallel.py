"""codistill_ds.exchange.vocab: the exchange and the losses on tensor-parallel vocabulary slices
equal the unsharded code (compress, sample_targets, losses) on the gathered logits.

Acceptance runs on real gloo ranks: one launch of 4 processes checks T = 2 and T = 4 and a K = 2,
T = 2 swap (tests/workers/vocab_parallel_check.py). The same check matrix also runs on T threads
in this process (a `TPComm` that simulates the group), and property tests draw shapes, uneven
vocabulary cuts and loss settings on threads: fast, and they cover cuts the launch does not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from vocab_checks import TOL, WIRE_REL, ThreadComm, W, assert_matrix, on_threads  # noqa: F401

from codistill_ds.exchange import vocab as vp
from codistill_ds.exchange.losses import distill_loss, top1_agreement
from codistill_ds.exchange.sampling import sample_targets
from codistill_ds.exchange.wire import CompressedLogits, WireFormat, compress, pack

# --------------------------------------------------------------------------- the same matrix on threads

@pytest.mark.parametrize("T", [3])
def test_matrix_on_threads(T):
    """T = 3 (not launched): the whole matrix on a simulated group."""
    assert_matrix(on_threads(T, W.run_matrix))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_property_losses_on_uneven_cuts(data):
    """Shapes, cuts (V not divisible by T: torch.chunk's cut), k (also > V/T), loss, kind,
    temperature and mask drawn; value and gradient against the unsharded loss."""
    T = data.draw(st.integers(2, 4), "T")
    V = data.draw(st.integers(T + 1, 40), "V")
    assume(all(w for _, w in _cuts(V, T)))
    n = data.draw(st.integers(1, 7), "n")
    loss = data.draw(st.sampled_from(["kl", "reverse_kl", "jsd", "mse", "samples"]), "loss")
    k = data.draw(st.integers(1, V - 1) | st.just(0), "k") if loss != "samples" else data.draw(st.integers(1, 9))
    temperature = data.draw(st.sampled_from([1.0, 0.5, 3.0]), "temperature")
    seed = data.draw(st.integers(0, 2**16), "seed")
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, V, generator=g) * 3, torch.randn(n, V, generator=g) * 3
    mask = torch.rand(n, generator=g) < 0.7 if data.draw(st.booleans(), "masked") else None
    if loss == "samples":
        target = sample_targets(t, k, temperature, "fp32", "auto", g)
    else:
        target = compress(t, k, torch.float32, "logits" if loss == "mse" else "logprobs", temperature)
    lname = "kl" if loss == "samples" else loss
    res = on_threads(T, lambda c: W.compare(s, c, lambda z: distill_loss(z, target, lname, temperature, mask),
                                            lambda v: vp.distill_loss(v, target, lname, temperature, mask)))
    for r in res:
        assert r["value_err"] <= TOL * max(1.0, abs(r["ref"])), r
        assert r["grad_err"] <= TOL, r
        assert r["got"] == res[0]["got"]


def _cuts(v: int, T: int) -> list[tuple[int, int]]:
    c = -(-v // T)
    return [(i * c, max(0, min(c, v - i * c))) for i in range(T)]


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 4), V=st.integers(8, 40), n=st.integers(1, 9), k=st.integers(1, 39),
       temperature=st.sampled_from([1.0, 0.7, 2.0]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["fp32", "bf16", "fp8"]))
def test_property_teacher_topk_and_row_split(T, V, n, k, temperature, seed, dtype):
    """Tie-free fp32 logits: the sliced top-k has the unsharded ids; values within one wire step;
    the row chunks reassemble bit for bit and their bytes add up to the payload's."""
    assume(all(w for _, w in _cuts(V, T)) and k < V)
    full = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3
    ref = compress(full, k, W.wire_dtype(dtype), "logprobs", temperature)

    def rank(c):
        vs = vp.VocabSlice.split(full, c)
        got = vp.compress(vs, k, W.wire_dtype(dtype), "logprobs", temperature)
        chunk = vp.compress_rows(vs, k, W.wire_dtype(dtype), "logprobs", temperature)
        return got, chunk, vp.gather_rows(chunk, n, c)

    res = on_threads(T, rank)
    for got, chunk, back in res:
        assert torch.equal(got.indices, ref.indices)
        rel = (got.values.float() - ref.values.float()).abs() / ref.values.float().abs().clamp_min(1e-30)
        assert rel.max() <= WIRE_REL[dtype]
        assert W.same(back, got) and W.same(got, res[0][0])
    assert sum(pack(c).numel() for _, c, _ in res) == pack(ref).numel()


# --------------------------------------------------------------------------- one process

def test_order_keys_sort_like_a_stable_descending_sort():
    z = torch.tensor([[1.0, -0.0, 0.0, float("nan"), float("-inf"), float("inf"), 1e-45, -1e-45, 1.0, -2.5]])
    from codistill_ds.exchange.vocab.teacher import _decode_keys, _order_keys

    keys = _order_keys(z, 100)
    order = keys.argsort(dim=-1, descending=True)
    want = [3, 5, 0, 8, 6, 1, 2, 7, 9, 4]  # NaN, inf, 1 (id 100 before 108), subnormal, -0 == +0 by id, ...
    assert order[0].tolist() == want
    vals, ids = _decode_keys(keys)
    assert torch.equal(ids, torch.arange(100, 110)[None])
    same = torch.where(torch.isnan(z), torch.full_like(z, float("nan")), z) + 0.0
    assert torch.equal(vals.view(torch.int32), same.view(torch.int32))  # -0 canonicalised to +0
    x = torch.randn(50, 300) * 1e3
    v2, _ = _decode_keys(_order_keys(x, 0))
    assert torch.equal(v2, x)


def test_row_range_cuts_like_tensor_split_and_bytes_add_up():
    for n in range(13):
        for T in (1, 2, 3, 4):
            cut = [vp.row_range(n, t, T) for t in range(T)]
            assert [len(r) for r in cut] == [len(p) for p in torch.arange(n).tensor_split(T)]
            assert [i for r in cut for i in r] == list(range(n))
    c = compress(torch.randn(10, 300), 8, torch.bfloat16, "logprobs", 1.0)
    chunks = [vp.rows_chunk(c, t, 4) for t in range(4)]
    assert [x.num_tokens() for x in chunks] == [3, 3, 2, 2]
    assert sum(pack(x).numel() for x in chunks) == pack(c).numel() == c.wire_format().payload_bytes(10)
    with pytest.raises(ValueError):
        vp.row_range(4, 2, 2)


def test_group_of_one_equals_the_unsharded_code():
    """group None (T = 1): no collective; the same numbers as losses / compress (ids equal)."""
    s, t = W.logits(1), W.logits(2)
    for topk in (8, 0):
        target = compress(t, topk, torch.float32, "logprobs", 2.0)
        r = W.compare(s, None, lambda z, c=target: distill_loss(z, c, "kl", 2.0, W.MASK),
                      lambda v, c=target: vp.distill_loss(v, c, "kl", 2.0, W.MASK))
        assert r["value_err"] <= TOL and r["grad_err"] <= TOL, r
    vs = vp.VocabSlice(s, 0, W.V)
    assert torch.equal(vp.compress(vs, 8, torch.float32, "logits", 1.0).indices, compress(s, 8, torch.float32, "logits", 1.0).indices)
    assert torch.equal(vp.argmax(vs), s.argmax(-1))
    assert not hasattr(s, "_codistill_vocab_slice")  # the whole vocabulary is not tagged
    distill_loss(s, compress(t, 8, torch.float32, "logprobs", 1.0), "kl", 1.0)  # still accepted


class _Rank0Of2(vp.TPComm):
    """A TP rank that never needs its peer: enough to build slices and hit the guards."""
    size, rank = 2, 0


def test_a_slice_never_reaches_the_whole_vocabulary_code():
    s, t = W.logits(1), W.logits(2)
    target = compress(t, 4, torch.float32, "logprobs", 1.0)  # k = 4 < V/T = 24: shapes alone pass
    vs = vp.VocabSlice(s[:, :24].clone(), 0, 48, _Rank0Of2(), ((0, 24), (24, 24)))
    with pytest.raises(TypeError, match="vocabulary slice"):
        distill_loss(vs, target, "kl", 1.0)
    with pytest.raises(TypeError, match="vocabulary slice"):
        distill_loss(vs.local, target, "kl", 1.0)  # the tagged local tensor
    with pytest.raises(TypeError, match="vocabulary slice"):
        compress(vs.local, 4, torch.float32, "logprobs", 1.0)
    with pytest.raises(TypeError, match="vocabulary slice"):
        sample_targets(vs.local, 4, 1.0)
    untagged = vs.local.detach().clone()
    with pytest.raises(ValueError, match="indexes a vocabulary of 48 but the student has 24"):
        distill_loss(untagged, target, "kl", 1.0)
    with pytest.raises(ValueError, match="indexes a vocabulary of 48"):
        top1_agreement(untagged, target)
    # The same target through the wire keeps the check (the receiver unpacks with its format).
    fmt = target.wire_format()
    received = fmt.unpack(pack(target), target.num_tokens())
    with pytest.raises(ValueError, match="indexes a vocabulary of 48"):
        distill_loss(untagged, received, "kl", 1.0)
    with pytest.raises(TypeError, match="takes a VocabSlice"):
        vp.distill_loss(s, target, "kl", 1.0)
    with pytest.raises(ValueError, match="do not tile"):
        vp.VocabSlice(s[:, :24], 0, 48, _Rank0Of2(), ((0, 24), (20, 28)))
    with pytest.raises(ValueError, match="do not hold my slice"):
        vp.VocabSlice(s[:, :24], 24, 48, _Rank0Of2(), ((0, 24), (24, 24)))


def test_wire_format_carries_the_vocabulary_as_metadata():
    f = WireFormat.choose(8, 300, "bf16")
    assert f.vocab == 300 and f == WireFormat(8, "bf16", "uint16", "logprobs")  # not part of equality
    assert f.payload_bytes(5) == WireFormat(8, "bf16", "uint16", "logprobs").payload_bytes(5)
    assert WireFormat.choose(0, 300, "bf16").vocab == 300
    assert sample_targets(torch.randn(3, 300), 4, 1.0).fmt.vocab == 300
    legacy = CompressedLogits(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), "logprobs")
    assert legacy.wire_format().vocab is None  # unknown vocabulary: no check
    with pytest.raises(ValueError):
        WireFormat(8, "bf16", "uint16", "logprobs", 0)


def test_cross_entropy_rejects_labels_outside_the_vocabulary():
    vs = vp.VocabSlice(W.logits(1), 0, W.V)
    with pytest.raises(ValueError, match="labels outside"):
        vp.cross_entropy(vs, torch.full((W.N,), W.V))
    all_ignored = vp.cross_entropy(vs, torch.full((W.N,), -100))
    assert math.isnan(all_ignored.item()) == math.isnan(F.cross_entropy(W.logits(1), torch.full((W.N,), -100)).item())

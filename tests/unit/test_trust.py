"""Trusting peers, in one process: payload checks, the peer guard, member-data and frame tags.

The receiver's path of `transport: torchft` is `trust.open_frame` (tag, byte length) -> the wire
format's `unpack` -> `guard.check_content` (ids, finiteness, scale) -> the losses. A seeded fuzz
(hypothesis) sends truncated, oversized, bit-flipped, out-of-range and NaN payloads down that path
and asserts that nothing raises and that whatever is accepted gives a finite loss. The engine is
then driven by a transport written here whose peers send bad payloads and wrong predictions, so
the counts by reason are checked exactly; the tags and the refusal rule are checked on member
data built here, as the Lighthouse would carry it.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codistill_ds.config import CodistillConfig, ConfigError
from codistill_ds.exchange.batches import ExchangeBatch
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.exchange.guard import check_content, judge, label_nll, next_tokens
from codistill_ds.exchange.losses import peer_distill_loss
from codistill_ds.exchange.transport import trust
from codistill_ds.exchange.transport.base import ExchangeResult
from codistill_ds.exchange.wire import (
    CompressedLogits,
    WireFormat,
    compress,
    wire_dtype,
)

V, N = 40, 12
KEY = b"k" * 32


pytestmark = pytest.mark.usefixtures("one_rank_world")  # tests/unit/conftest.py


def payload(seed: int = 0, topk: int = 8, dtype: str = "bf16", kind: str = "logprobs", n: int = N) -> CompressedLogits:
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3
    return compress(logits, topk, wire_dtype(dtype), kind, 1.0)


# ---- integrity: guard.check_content -------------------------------------------------------------

def test_check_content_names_each_problem():
    good = payload()
    assert check_content(good, V) is None
    assert check_content(payload(topk=0), V) is None  # full vocabulary
    assert check_content(payload(kind="logits"), V) is None
    ids = good.indices.clone()
    ids[3, 2] = V  # one past the vocabulary: an index error inside the loss
    assert check_content(CompressedLogits(good.values, ids, "logprobs"), V) == "malformed"
    ids[3, 2] = -1
    assert check_content(CompressedLogits(good.values, ids, "logprobs"), V) == "malformed"
    ids = good.indices.clone()
    ids[0, 1] = ids[0, 0]  # the same id twice in a top-k row
    assert check_content(CompressedLogits(good.values, ids, "logprobs"), V) == "malformed"
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = good.values.clone()
        v[5, 0] = bad
        assert check_content(CompressedLogits(v, good.indices, "logprobs"), V) == "nan"
    assert check_content(CompressedLogits(good.values + 1.0, good.indices, "logprobs"), V) == "malformed"  # p > 1
    flat = torch.full_like(good.values, -0.01)  # eight entries with p ~ 0.99 each: 8x the mass
    assert check_content(CompressedLogits(flat, good.indices, "logprobs"), V) == "malformed"
    huge = payload(kind="logits")
    assert check_content(CompressedLogits(huge.values * 1e5, huge.indices, "logits"), V) == "malformed"


def test_fp8_rounding_is_not_malformed():
    """fp8's 2^-4 relative rounding can push the top-k mass past 1: within LSE_SLACK."""
    for seed in range(20):
        assert check_content(payload(seed, topk=16, dtype="fp8"), V) is None


def _receive(buf: torch.Tensor, declared: int, fmt: WireFormat, n: int) -> tuple[CompressedLogits | None, str | None]:
    """The receiving leader's path, as in lighthouse.round + ft._swap + the engine."""
    expected = fmt.payload_bytes(n)
    size = trust.frame_size([declared, expected, expected])
    sent = trust.frame(buf, size, trust.frame_tag(KEY, "q1/0/a,b", "b", 3, declared, buf[:size]))
    body, why = trust.open_frame(sent, size, declared, expected, KEY, "q1/0/a,b", "b", 3)
    if why is not None:
        return None, why
    p = fmt.unpack(body, n)
    return p, check_content(p, V)


FORMATS = [WireFormat.choose(8, V, "bf16", "uint16"), WireFormat.choose(8, V, "fp8", "int32"),
           WireFormat.choose(0, V, "fp16"), WireFormat.choose(4, V, "fp32", "int32", "logits")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt_i=st.integers(0, len(FORMATS) - 1), seed=st.integers(0, 2**16),
       action=st.sampled_from(["truncate", "extend", "flip", "ids", "nan", "none"]),
       where=st.floats(0, 1), value=st.integers(0, 255), cut=st.integers(1, 64))
def test_fuzzed_payloads_never_crash_the_receiver(fmt_i, seed, action, where, value, cut):
    """Whatever bytes arrive, the receiver returns a verdict; what it accepts distills finitely."""
    fmt = FORMATS[fmt_i]
    good = payload(seed, topk=fmt.k if not fmt.full_vocab else 0, dtype=fmt.value_dtype, kind=fmt.kind)
    buf = fmt.pack(CompressedLogits(good.values, good.indices, fmt.kind, fmt))
    expected = buf.numel()
    if action == "truncate":
        buf = buf[:max(expected - cut, 0)]
    elif action == "extend":
        buf = torch.cat([buf, torch.full((cut * 97,), value, dtype=torch.uint8)])
    elif action == "flip":
        buf = buf.clone()
        buf[int(where * (expected - 1))] = value
    elif action == "ids" and not fmt.full_vocab:
        p = fmt.unpack(buf.clone(), N)
        p.indices[int(where * (N - 1)), 0] = V + value  # past the vocabulary
        buf = fmt.pack(CompressedLogits(p.values, p.indices, fmt.kind, fmt))
    elif action == "nan":
        p = fmt.unpack(buf.clone(), N)
        p.values[int(where * (N - 1)), 0] = float("nan")
        buf = fmt.pack(CompressedLogits(p.values, p.indices, fmt.kind, fmt))
    got, why = _receive(buf, buf.numel(), fmt, N)
    if action in ("truncate", "extend"):
        assert why == "malformed" and got is None
    if action == "ids" and not fmt.full_vocab:
        assert why == "malformed"
    if action == "nan":
        assert why in ("nan", "malformed")  # fp8 keeps NaN; the tail check may see it first
    if why is None:
        student = torch.randn(N, V)
        loss = peer_distill_loss(student, [got], "mse" if fmt.kind == "logits" else "kl", 1.0)
        assert math.isfinite(float(loss))


def test_a_frame_cut_short_or_blown_up_travels_at_a_capped_size():
    """Every member computes the frame from the declared sizes alone (its own payload may be the
    bad one): the largest, capped at FRAME_CAP x the size most members declare."""
    assert trust.frame_size([100, 100]) == 100
    assert trust.frame_size([100, 100, 60]) == 100  # truncated: padded
    assert trust.frame_size([100, 100, 10**12]) == trust.FRAME_CAP * 100  # never past the cap
    assert trust.frame_size([100, 10**12]) == trust.FRAME_CAP * 100  # a tie: the smaller size sets the cap
    assert trust.frame_size([100, -5]) == 2  # a tie with nothing: honest bytes cut, counted malformed
    # a frame cut below an honest payload is "malformed" at every receiver, never unpacked short
    body = torch.arange(100, dtype=torch.uint8)
    sent = trust.frame(body, 10, trust.frame_tag(KEY, "r", "a", 1, 100, body[:10]))
    assert trust.open_frame(sent, 10, 100, 100, KEY, "r", "a", 1) == (None, "malformed")


# ---- authentication: trust.py -------------------------------------------------------------------

def member(group: int, key: bytes | None, started: float = 1.0, **change):
    fields = {"group": group, "exchange": 3, "contract": {"vocab_size": V}, "nonce": f"n{group}", "started": started,
              "gen": 0, "joining": False, "nbytes": 100, "report": {"loss": 2.0, "step": 5},
              "replica": f"group_{group}_x"}
    fields.update(change)
    return SimpleNamespace(replica_id=f"group_{group}_x", store_address="s", data=trust.seal(fields, key))


def test_member_data_verifies_only_under_the_same_secret():
    m = trust.open_member(member(0, KEY), KEY)
    assert m.verified and m.tagged and m.data["group"] == 0
    assert not trust.open_member(member(0, b"o" * 32), KEY).verified
    assert not trust.open_member(member(0, None), KEY).verified
    forged = member(0, KEY)  # the signed text changed after signing: the tag no longer matches
    forged.data["signed"] = forged.data["signed"].replace('"group":0', '"group":1')
    assert not trust.open_member(forged, KEY).verified
    replayed = member(0, KEY)  # valid data under another replica id
    replayed.replica_id = "group_0_other"
    assert not trust.open_member(replayed, KEY).verified
    assert not trust.open_member(SimpleNamespace(replica_id="r", store_address="s", data={"group": 0}), None).verified
    assert trust.open_member(member(0, None), None).verified  # no secret anywhere: as before


def test_a_job_without_the_secret_or_with_another_is_refused_and_cannot_refuse_others():
    running = [member(0, KEY), member(1, KEY)]
    for key, text in ((None, "this job has none"), (b"o" * 32, "does not match")):
        newcomer = member(2, key)
        seen = [trust.open_member(p, key) for p in [*running, newcomer]]
        why = trust.refusal(seen, key)
        assert why is not None and text in why and "codistill.secret_file" in why
        # the running groups leave it out and go on
        theirs = [trust.open_member(p, KEY) for p in [*running, newcomer]]
        assert trust.refusal(theirs, KEY) is None and [m.verified for m in theirs] == [True, True, False]
    # one intruder claiming to be older never makes a lone running group refuse itself
    lone = [trust.open_member(p, KEY) for p in (member(0, KEY, started=5.0), member(9, b"o" * 32, started=0.0))]
    assert trust.refusal(lone, KEY) is None


def test_frame_tags_bind_the_round_the_sender_and_the_bytes():
    data = torch.arange(50, dtype=torch.uint8)
    tag = trust.frame_tag(KEY, "q7/0/a,b", "a", 4, 50, data)
    sent = trust.frame(data, 50, tag)
    assert trust.open_frame(sent, 50, 50, 50, KEY, "q7/0/a,b", "a", 4)[1] is None
    assert trust.open_frame(sent, 50, 50, 50, KEY, "q8/0/a,b", "a", 4)[1] == "auth"  # replayed in a later quorum
    assert trust.open_frame(sent, 50, 50, 50, KEY, "q7/0/a,b", "a", 5)[1] == "auth"  # another exchange
    assert trust.open_frame(sent, 50, 50, 50, b"o" * 32, "q7/0/a,b", "a", 4)[1] == "auth"
    tampered = sent.clone()
    tampered[7] ^= 1
    assert trust.open_frame(tampered, 50, 50, 50, KEY, "q7/0/a,b", "a", 4)[1] == "auth"


def test_the_secret_is_read_checked_and_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv(trust.SECRET_ENV, raising=False)
    cd = CodistillConfig(transport="torchft")
    assert trust.load_secret(cd) is None
    path = tmp_path / "secret"
    path.write_text("s3cr3t-but-short\n"[:10])
    cd.secret_file = str(path)
    with pytest.raises(ConfigError, match="at least 16") as err:
        trust.load_secret(cd)
    assert "s3cr3t" not in str(err.value)
    path.write_text("0123456789abcdef0123\n")
    assert trust.load_secret(cd) == b"0123456789abcdef0123"
    cd.secret_file = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="codistill.secret_file.*cannot read"):
        trust.load_secret(cd)
    monkeypatch.setenv(trust.SECRET_ENV, "from-the-environment-0123")
    assert trust.load_secret(CodistillConfig(transport="torchft")) == b"from-the-environment-0123"
    assert trust.load_secret(CodistillConfig(transport="world")) is None


# ---- the peer guard -----------------------------------------------------------------------------

def test_label_nll_scores_the_distribution_a_payload_stands_for():
    tokens = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    labels = next_tokens(tokens, None, None)
    assert labels.tolist() == tokens[:, 1:].reshape(-1).tolist()
    # a full-vocabulary payload: exactly the cross-entropy
    logits = torch.randn(12, V)
    full = compress(logits, 0, torch.float32, "logprobs", 1.0)
    want = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    total, count = label_nll(full, labels, V)
    assert count == 12 and abs(total - float(want)) < 1e-3
    # a confident model that is right scores low; random sharp predictions about ln(V) or worse
    right = torch.full((12, V), -5.0)
    right[torch.arange(12), labels] = 5.0
    good = label_nll(compress(right, 4, torch.float32, "logprobs", 1.0), labels, V)
    noise = label_nll(compress(torch.randn(12, V) * 4, 4, torch.float32, "logprobs", 1.0), labels, V)
    assert good[0] / 12 < 0.1 and noise[0] / 12 > math.log(V - 4)
    masked = next_tokens(tokens, None, torch.tensor([True, False] * 6))
    assert (masked == -1).sum() == 6


def test_judge_orders_the_reasons():
    peers = [payload(1), payload(2), payload(3), payload(4)]
    bad_ids = peers[0].indices.clone()
    bad_ids[0, 0] = V + 3
    peers[0] = CompressedLogits(peers[0].values, bad_ids, "logprobs")
    v = peers[1].values.clone()
    v[0, 0] = float("nan")
    peers[1] = CompressedLogits(v, peers[1].indices, "logprobs")
    reports = [None, None, {"loss": 9.0, "step": 3}, {"loss": 2.0, "step": 3}]
    verdict = judge(peers, [None] * 4, None, None, V, dist.group.WORLD, ratio=1.5, reports=reports, my_loss=2.0)
    assert verdict.reasons == ["malformed", "nan", "loss", None]
    off = judge(peers, [None] * 4, None, None, V, dist.group.WORLD, ratio=0.0, reports=reports, my_loss=2.0)
    assert off.reasons == ["malformed", "nan", None, None]  # integrity is always checked


def test_the_labels_check_decides_on_each_peers_average():
    """One unlucky round of a healthy peer is not a reason; a peer bad from its first round is."""
    from codistill_ds.exchange.guard import _labels_worse

    history: dict[int, float] = {}
    healthy = [_labels_worse(nll, 2.0, 2.0, 1, history) for nll in (2.1, 1.9, 8.0, 2.2, 2.0)]
    bad = [_labels_worse(nll, 2.0, 2.0, 2, history) for nll in (9.0, 9.5, 2.0, 9.0)]
    assert healthy == [False] * 5 and bad == [True] * 4, history
    assert _labels_worse(8.0, 2.0, 2.0, 3, None)  # no history: this round alone


# ---- the engine, driven by bad peers ------------------------------------------------------------

B, L = 3, 6


def tokens(e: int) -> torch.Tensor:
    return torch.randint(0, V, (B, L + 1), generator=torch.Generator().manual_seed(100 + e))


def teacher(ids: torch.Tensor) -> torch.Tensor:
    """A model that knows the exchange stream: confident on each next token."""
    out = torch.full((ids.shape[0], ids.shape[1] - 1, V), -4.0)
    out.scatter_(2, ids[:, 1:, None], 4.0)
    return out.flatten(0, 1)


KINDS = ("good", "random", "ids", "nan", "scale", "liar", "short")


class BadPeers:
    """Peer 1 is healthy; peer 2 sends, by exchange index, one of KINDS ("liar": good predictions
    but a reported loss 10x mine; "short": the transport already refused its frame)."""

    bytes_sent = 0

    def exchange(self, local: CompressedLogits, e: int, report: dict | None = None) -> ExchangeResult:
        s = ExchangeSettings(topk=8, dtype="bf16")
        good = compress(teacher(tokens(e)), s.topk, wire_dtype(s.dtype), "logprobs", 1.0)
        kind = KINDS[e % len(KINDS)]
        bad, rejected = good, {}
        if kind == "random":
            bad = compress(torch.randn(B * L, V) * 4, 8, wire_dtype("bf16"), "logprobs", 1.0)
        elif kind == "ids":
            ids = good.indices.clone()
            ids[2, 3] = 60000
            bad = CompressedLogits(good.values, ids, "logprobs", good.fmt)
        elif kind == "nan":
            bad = CompressedLogits(good.values * float("nan"), good.indices, "logprobs", good.fmt)
        elif kind == "scale":
            bad = CompressedLogits(good.values.abs(), good.indices, "logprobs", good.fmt)
        reports = [{"loss": 2.0, "step": e}, {"loss": 20.0 if kind == "liar" else 2.0, "step": e}]
        if kind == "short":
            return ExchangeResult([good], [1], 0.0, None, 0, reports[:1], {"malformed": 1})
        return ExchangeResult([good, bad], [1, 2], 0.0, None, 0, reports, rejected)

    def start(self, *a):
        raise AssertionError("blocking swaps only")

    def join(self, groups, wait_s):
        return 3

    def close(self):
        pass


def run_engine(ratio: float, steps: int) -> ExchangeEngine:
    eng = ExchangeEngine(transport=BadPeers(), settings=ExchangeSettings(topk=8, dtype="bf16", peer_guard_ratio=ratio),
                         group=dist.group.WORLD, group_id=0,
                         batch_for=lambda step, e: ExchangeBatch(tokens(e), rows=range(B)))
    eng.note_loss(0, 2.0)
    for step in range(steps):
        due = eng.step(step, teacher)
        kind = KINDS[step % len(KINDS)]
        used = [g for b in due for g in b.peer_groups]
        student = [torch.randn(B * L, V, requires_grad=True) for _ in due]
        if due:
            assert math.isfinite(eng.distill_loss(student, due).item())
        if ratio == 0:  # integrity only: whatever is well-formed is used, wrong or not
            assert used == ([1, 2] if kind in ("good", "random", "liar") else [1]), (step, kind, used)
        else:  # a peer that sent random predictions stays distrusted (its label NLL average)
            assert used == ([1, 2] if step == 0 else [1]), (step, kind, used)
    return eng


def test_the_engine_skips_and_counts_each_bad_payload_and_keeps_going():
    steps = 3 * len(KINDS)
    on = run_engine(1.5, steps)
    # labels: the 3 random rounds and the 2 good rounds after the first random one
    assert on.skipped_reasons == {"malformed": 9, "nan": 3, "auth": 0, "loss": 3, "labels": 5}
    assert on.skipped_peers == 20 and set(on.label_history) == {1, 2} and on.label_history[2] > math.log(1.5)
    off = run_engine(0.0, steps)  # guard off: integrity still checked, wrong predictions used
    assert off.skipped_reasons == {"malformed": 9, "nan": 3, "auth": 0, "loss": 0, "labels": 0}
    state = json.loads(json.dumps(on.state_dict()["skipped_reasons"]))
    assert state == on.skipped_reasons

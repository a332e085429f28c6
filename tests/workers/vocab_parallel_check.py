"""Rank program: the vocabulary-parallel exchange and losses (codistill_ds.exchange.vocab)
against the unsharded code on the gathered logits. Args: OUT.

Four ranks, one launch: T = 2 (TP groups {0,1} and {2,3}) and T = 4 (all four) run the whole
check matrix; then K = 2 codistillation groups of T = 2 swap row-split payloads over their rails
({0,2}, {1,3}) like the exchange engine will. Every rank builds the same full logits from fixed
seeds, keeps its slice for the sliced code, and computes the reference on the whole.

The check functions take the TP group as an argument (a process group, or any
`vocab_parallel.TPComm`), so tests/unit/test_vocab_parallel.py also runs them on T threads."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from codistill_ds.exchange import vocab as vp
from codistill_ds.exchange.losses import distill_loss, peer_distill_loss, top1_agreement
from codistill_ds.exchange.sampling import sample_targets
from codistill_ds.exchange.wire import CompressedLogits, compress, pack, wire_dtype

N, V, K = 12, 48, 8
MASK = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, True])


def logits(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def tiny_tail(seed: int, ids: torch.Tensor) -> torch.Tensor:
    """Logits whose entries at `ids` [N, k] hold all but ~1e-12 of the mass."""
    z = logits(seed, scale=0.1)
    return z.scatter(-1, ids, 28.0 + z.gather(-1, ids))


def scenarios() -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name: (student [N, V], teacher [N, V], k)."""
    s, t = logits(1), logits(2)
    t_ids = t.topk(K, dim=-1).indices
    one = logits(3)
    one[:, :V // 4] += 12.0  # the teacher's top-8 all on vocabulary [0, 12): one slice for T = 2, 4
    return {
        "random": (s, t, K),
        "tail_1e-12": (tiny_tail(4, t_ids), tiny_tail(5, t_ids), K),  # student and teacher tails ~1e-12
        "one_slice": (s, one, K),
        "k_gt_slice": (s, t, 30),  # 30 > V/2 = 24 > V/4 = 12
    }


def digest(c: CompressedLogits) -> str:
    return hashlib.sha1(pack(c).numpy().tobytes()).hexdigest()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def same(a: CompressedLogits, b: CompressedLogits) -> bool:
    ids = (a.indices is None and b.indices is None) or (
        a.indices is not None and b.indices is not None and torch.equal(a.indices, b.indices))
    return (a.kind == b.kind and a.values.dtype == b.values.dtype and ids
            and torch.equal(bits(a.values), bits(b.values)))


def sliced(full: torch.Tensor, group) -> tuple[vp.VocabSlice, torch.Tensor]:
    """My slice of `full` as a fresh leaf (its .grad is the sliced gradient)."""
    comm = vp.tp_comm(group)
    bounds = vp.chunk_bounds(full.shape[1], comm.size)
    o, w = bounds[comm.rank]
    leaf = full[:, o:o + w].clone().requires_grad_(True)
    return vp.VocabSlice(leaf, o, full.shape[1], comm, bounds), leaf


def compare(full: torch.Tensor, group, ref_fn, vp_fn) -> dict:
    """Value and gradient of ref_fn(whole leaf) against vp_fn(VocabSlice)."""
    whole = full.clone().requires_grad_(True)
    ref = ref_fn(whole)
    ref.backward()
    vs, leaf = sliced(full, group)
    got = vp_fn(vs)
    got.backward()
    o, w = vs.offset, vs.width
    return {"ref": ref.item(), "got": got.item(), "value_err": abs(got.item() - ref.item()),
            "grad_err": (leaf.grad - whole.grad[:, o:o + w]).abs().max().item(),
            "grad_scale": whole.grad.abs().max().item()}


def targets_for(teacher: torch.Tensor, loss: str, topk: int, temperature: float) -> CompressedLogits:
    if loss == "samples":
        return sample_targets(teacher, topk or K, temperature, "fp32", "auto",
                              torch.Generator().manual_seed(7))
    kind = "logits" if loss == "mse" else "logprobs"
    return compress(teacher, topk, torch.float32, kind, temperature)


def student_checks(group) -> dict:
    """Every loss kind x top-k / full vocabulary x temperature x mask on every scenario, plus
    peers with weights, cross-entropy, argmax and agreement."""
    out: dict[str, dict] = {}
    for name, (student, teacher, k) in scenarios().items():
        for loss in ("kl", "reverse_kl", "jsd", "mse", "samples"):
            for topk in ((k,) if loss == "samples" else (k, 0)):
                for temperature in (1.0, 2.5):
                    target = targets_for(teacher, loss, topk, temperature)
                    lname = "kl" if loss == "samples" else loss
                    for mname, mask in (("all", None), ("masked", MASK)):
                        out[f"{name}/{loss}/k{topk}/T{temperature}/{mname}"] = compare(
                            student, group,
                            lambda z, a=(target, lname, temperature, mask): distill_loss(z, *a),
                            lambda v, a=(target, lname, temperature, mask): vp.distill_loss(v, *a))
    # Two peers, one top-k and one full vocabulary, weighted: the shared log-sum-exp path.
    s, t = logits(1), logits(2)
    peers = [compress(t, K, torch.float32, "logprobs", 2.0), compress(logits(6), 0, torch.float32, "logprobs", 2.0)]
    out["peers/weighted"] = compare(s, group, lambda z: peer_distill_loss(z, peers, "jsd", 2.0, MASK, [0.3, 1.2]),
                                    lambda v: vp.peer_distill_loss(v, peers, "jsd", 2.0, MASK, [0.3, 1.2]))
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(8))
    labels[[1, 4]] = -100
    for red in ("mean", "sum", "none"):
        out[f"ce/{red}"] = compare(
            s, group, lambda z, r=red: F.cross_entropy(z, labels, ignore_index=-100, reduction=r).sum(),
            lambda v, r=red: vp.cross_entropy(v, labels, -100, r).sum())  # sum: "none" gives [N]
    out["ce/tail_1e-12"] = compare(scenarios()["tail_1e-12"][0], group,
                                   lambda z: F.cross_entropy(z, labels), lambda v: vp.cross_entropy(v, labels))
    return out


def agreement_checks(group) -> dict:
    """argmax with ties (small integers: many equal maxima across slices) and top-1 agreement."""
    z = torch.randint(0, 3, (64, V), generator=torch.Generator().manual_seed(9)).float()
    z[0] = 2.0  # every entry tied
    z[1, V - 1], z[2, 5], z[2, V - 3] = 9.0, float("nan"), float("nan")
    vs, _ = sliced(z, group)
    got = vp.argmax(vs)
    s, t = logits(1), logits(2)
    res = {"argmax_equal": bool(torch.equal(got, z.argmax(dim=-1)))}
    for name, target in (("topk", compress(t, K, torch.bfloat16, "logprobs", 1.0)),
                         ("full", compress(t, 0, torch.bfloat16, "logprobs", 1.0)),
                         ("self", compress(s, 3, torch.float32, "logprobs", 1.0))):
        for mname, mask in (("all", None), ("masked", MASK)):
            res[f"{name}/{mname}"] = [list(top1_agreement(s, target, mask)),
                                      list(vp.top1_agreement(sliced(s, group)[0], target, mask))]
    return res


FORMATS = {  # name: (value dtype, index dtype, topk, kind, temperature)
    "fp32-int32-top8": ("fp32", "int32", 8, "logprobs", 1.0),
    "fp32-auto-top8-T2": ("fp32", "auto", 8, "logprobs", 2.0),
    "bf16-uint16-top8": ("bf16", "uint16", 8, "logprobs", 1.0),
    "fp16-auto-top1-T0.5": ("fp16", "auto", 1, "logprobs", 0.5),
    "fp8-int32-top8": ("fp8", "int32", 8, "logprobs", 1.0),
    "fp32-top8-logits": ("fp32", "auto", 8, "logits", 1.0),
    "bf16-top30-k>V/T": ("bf16", "auto", 30, "logprobs", 1.5),
    "fp32-top47": ("fp32", "auto", 47, "logprobs", 1.0),
    "fp32-full": ("fp32", "auto", 0, "logprobs", 1.0),
    "bf16-full-logits": ("bf16", "auto", 0, "logits", 1.0),
    "fp8-full-T2": ("fp8", "auto", 0, "logprobs", 2.0),
}


def teacher_checks(group) -> dict:
    """Sliced compress against `compress` of the whole logits, every format; the row split's
    bytes and round trip; ties; samples."""
    comm = vp.tp_comm(group)
    out: dict[str, dict] = {}
    for n in (N, 10):  # 10 rows: chunks of unequal length for T = 4
        full = logits(11, n=n, scale=3.0)
        vs, _ = sliced(full, group)
        for name, (dt, idx, topk, kind, temperature) in FORMATS.items():
            ref = compress(full, topk, wire_dtype(dt), kind, temperature, idx)
            got = vp.compress(vs, topk, wire_dtype(dt), kind, temperature, idx)
            diff = (got.values.float() - ref.values.float()).abs()
            chunks = [vp.rows_chunk(got, t, comm.size) for t in range(comm.size)]
            mine = vp.compress_rows(vs, topk, wire_dtype(dt), kind, temperature, idx)
            out[f"n{n}/{name}"] = {
                "ids_equal": (ref.indices is None and got.indices is None) or bool(torch.equal(ref.indices, got.indices)),
                "fmt_equal": got.fmt == ref.fmt and got.fmt.vocab == ref.fmt.vocab == V,
                "value_err": diff.max().item(),
                "value_rel": (diff / ref.values.float().abs().clamp_min(1e-30)).max().item(),
                "bits_differ": int((bits(got.values) != bits(ref.values)).sum()),
                "digest": digest(got),
                "bytes": pack(ref).numel(), "chunk_bytes": [pack(c).numel() for c in chunks],
                "compress_rows_equal": same(mine, chunks[comm.rank]),
                "gather_rows_equal": same(vp.gather_rows(chunks[comm.rank], n, group), got),
            }
    # Ties: small integers in fp32, and bf16 logits (the dtype a GPU model gives).
    for name, full in (("ties_int", torch.randint(-3, 3, (64, V), generator=torch.Generator().manual_seed(12)).float()),
                       ("ties_bf16", logits(13, n=64).to(torch.bfloat16))):
        vs, _ = sliced(full, group)
        for topk in (1, 8, 30):
            got = vp.compress(vs, topk, torch.float32, "logits", 1.0)
            ref = compress(full, topk, torch.float32, "logits", 1.0)
            stable = torch.sort(full.float(), dim=-1, descending=True, stable=True).indices[:, :topk]
            out[f"{name}/top{topk}"] = {
                "values_equal": bool(torch.equal(got.values, ref.values)),
                "values_at_ids_equal": bool(torch.equal(full.float().gather(-1, got.indices.long()),
                                                        full.float().gather(-1, ref.indices.long()))),
                "lowest_id_rule": bool(torch.equal(got.indices.long(), stable)),
                "rows_same_ids_as_torch_topk": int((got.indices == ref.indices).all(-1).sum()),
                "rows": full.shape[0], "digest": digest(got)}
    out["samples"] = sample_checks(group)
    return out


def sample_checks(group) -> dict:
    full = logits(14, scale=1.5)
    vs, _ = sliced(full, group)
    whole = vp.VocabSlice(full.clone(), 0, V)  # T = 1 through the same function
    got = vp.sample_targets(vs, 16, 2.0, "fp32", "auto", torch.Generator().manual_seed(3))
    one = vp.sample_targets(whole, 16, 2.0, "fp32", "auto", torch.Generator().manual_seed(3))
    ref_values = torch.log_softmax(full / 2.0, dim=-1).gather(-1, got.indices.long())
    # Generators seeded differently on each TP rank: rank 0's uniforms are used by all.
    other = vp.sample_targets(vs, 16, 2.0, "fp32", "auto",
                              torch.Generator().manual_seed(3 + 100 * vp.tp_comm(group).rank))
    # Distribution: 40,000 draws on one token, counts against p (z-scores).
    row = logits(15, n=1, scale=1.0)
    big = vp.sample_targets(sliced(row, group)[0], 40_000, 1.0, "fp32", "int32",
                            torch.Generator().manual_seed(5))
    counts = torch.bincount(big.indices[0].long(), minlength=V).double()
    p = torch.softmax(row[0].double(), dim=-1)
    z = (counts - 40_000 * p) / (40_000 * p * (1 - p)).sqrt()
    return {"same_ids_as_T1": bool(torch.equal(got.indices, one.indices)),
            "value_err": (got.values.float() - ref_values).abs().max().item(),
            "fmt_vocab": got.fmt.vocab, "digest": digest(got), "digest_other_seeds": digest(other),
            "max_abs_z": z.abs().max().item(), "ids_in_range": bool(((big.indices >= 0) & (big.indices < V)).all())}


def guard_checks(group) -> dict:
    """The unsharded code refuses a slice in every form; the sliced code refuses a tensor."""
    from codistill_ds.exchange.losses import distill_loss as whole_loss

    s, t = logits(1), logits(2)
    target = compress(t, 4, torch.float32, "logprobs", 1.0)
    vs, leaf = sliced(s, group)
    attempts = {
        "loss(VocabSlice)": lambda: whole_loss(vs, target, "kl", 1.0),
        "loss(local tensor)": lambda: whole_loss(leaf, target, "kl", 1.0),
        "loss(untagged copy, k < V/T)": lambda: whole_loss(leaf.detach().clone(), target, "kl", 1.0),
        "agreement(untagged copy)": lambda: top1_agreement(leaf.detach().clone(), target),
        "compress(local tensor)": lambda: compress(leaf, 4, torch.float32, "logprobs", 1.0),
        "sample_targets(local tensor)": lambda: sample_targets(leaf, 4, 1.0),
        "vp.loss(tensor)": lambda: vp.distill_loss(s, target, "kl", 1.0),
        "vp.loss(local-vocab target)": lambda: vp.distill_loss(
            vs, compress(leaf.detach().clone(), 4, torch.float32, "logprobs", 1.0), "kl", 1.0),
    }
    out = {}
    for name, fn in attempts.items():
        try:
            fn()
            out[name] = "no error"
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def dtensor_checks(group) -> dict:
    """VocabSlice.from_dtensor on a Shard(-1) DTensor: offsets, loss, gradient into the DTensor;
    the unsharded loss refuses the DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = DeviceMesh.from_group(group, "cpu")
    s, t = logits(1), logits(2)
    target = compress(t, K, torch.float32, "logprobs", 2.0)
    whole = s.clone().requires_grad_(True)
    ref = distill_loss(whole, target, "kl", 2.0, MASK)
    ref.backward()
    dt = distribute_tensor(s.view(3, 4, V), mesh, [Shard(2)]).detach().requires_grad_(True)
    vs = vp.VocabSlice.from_dtensor(dt)
    got = vp.distill_loss(vs, target, "kl", 2.0, MASK)
    got.backward()
    o, w = vs.offset, vs.width
    try:
        distill_loss(dt.view(N, V), target, "kl", 2.0)
        refused = "no error"
    except TypeError as e:
        refused = str(e)
    return {"offset": o, "width": w, "rank": dist.get_rank(group),
            "value_err": abs(got.item() - ref.item()),
            "grad_err": (dt.grad.to_local().reshape(N, w) - whole.grad[:, o:o + w]).abs().max().item(),
            "refused": refused}


def exchange_checks(tp, rail, group_id: int) -> dict:
    """K = 2 groups of T = 2: teacher payload from the slices, TP rank t sends rows chunk t over
    its rail, the TP group reassembles the peer's payload; then the student loss on it."""
    from codistill_ds.distributed import comm

    c = vp.tp_comm(tp)
    out = {}
    student, peer_full = logits(20 + group_id), logits(20 + (1 - group_id))
    vs, leaf = sliced(student, tp)
    for name in ("bf16-uint16-top8", "fp8-int32-top8", "fp32-full", "bf16-top30-k>V/T"):
        dt, idx, topk, kind, temperature = FORMATS[name]
        mine = vp.compress_rows(vs, topk, wire_dtype(dt), kind, temperature, idx)
        buf = pack(mine)
        got = comm.all_gather(buf, group=rail)[1 - group_id]  # the peer group's same TP rank
        chunk = mine.wire_format().unpack(got, mine.num_tokens()).rows(0, mine.num_tokens())
        peer = vp.gather_rows(chunk, N, tp)
        ref = compress(peer_full, topk, wire_dtype(dt), kind, temperature, idx)
        own = vp.compress(vs, topk, wire_dtype(dt), kind, temperature, idx)
        out[name] = {"sent_bytes": buf.numel(), "t1_bytes": pack(ref).numel(),
                     "own_digest": digest(own), "peer_digest": digest(peer),
                     "fmt_bytes": ref.wire_format().payload_bytes(N),
                     "ids_equal": ref.indices is None or bool(torch.equal(peer.indices, ref.indices)),
                     "value_err": (peer.values.float() - ref.values.float()).abs().max().item(),
                     "bits_differ": int((bits(peer.values) != bits(ref.values)).sum())}
        if kind == "logprobs":
            leaf.grad = None
            whole = student.clone().requires_grad_(True)
            r = distill_loss(whole, ref, "kl", temperature, MASK)
            r.backward()
            g = vp.distill_loss(vs, peer, "kl", temperature, MASK)
            g.backward()
            out[name]["loss_ref"], out[name]["loss_err"] = r.item(), abs(g.item() - r.item())
            out[name]["grad_err"] = (leaf.grad - whole.grad[:, vs.offset:vs.offset + vs.width]).abs().max().item()
    out["tp_rank"] = c.rank
    return out


def run_matrix(group) -> dict:
    return {"student": student_checks(group), "agreement": agreement_checks(group),
            "teacher": teacher_checks(group), "guards": guard_checks(group)}


def main() -> None:
    import torch.distributed as dist

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 4
    tp2 = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    tp4 = dist.new_group([0, 1, 2, 3])
    rails = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine2 = tp2[rank // 2]
    result = {"rank": rank, "T2": run_matrix(mine2), "T4": run_matrix(tp4),
              "dtensor_T2": dtensor_checks(mine2), "dtensor_T4": dtensor_checks(tp4),
              "exchange": exchange_checks(mine2, rails[rank % 2], rank // 2)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

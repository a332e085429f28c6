"""The exchange and the distillation losses on tensor-parallel vocabulary slices, exact.

With tensor parallelism of degree T inside a group, the vocabulary-parallel `lm_head` leaves TP
rank t with the logits of a contiguous vocabulary slice, [N, V_t] of [N, V]. Everything the
codistillation exchange computes from logits is a per-token reduction over the vocabulary, so it
can be computed from the slices with a few per-token collectives over the TP group, never
gathering the [N, V] logits (docs/design.md "Model parallelism inside a group"):

- log-sum-exp: an all-reduce of the per-slice max, then of the sums of exp(z - max);
- teacher top-k: each slice's top-min(k, V_t) with global ids (every global top-k entry is in its
  slice's top-k), an all-gather of those T x min(k, V_t) candidates, one re-selection;
- student: log q at the teacher's ids is a sum over tp of an owner-masked gather; the tail bucket
  a sum over tp of exp(z - max) with those ids masked out; each sum is an all-reduce in forward
  and the identity in backward (Megatron's `_ReduceFromModelParallelRegion`): the loss is then
  the same number on every TP rank, and rank t's backward gives d loss / d (its slice), exactly
  the slice of the full-vocabulary gradient. kl / reverse_kl / jsd, mse, sampled targets and
  full-vocabulary targets reuse the summands of `losses.py`;
- cross-entropy is the same primitive with the label as the only id; argmax is a local argmax and
  an all-gather (ties go to the lowest global id, like torch.argmax).

Exactness against the unsharded code (`wire.compress`, `sampling.sample_targets`,
`losses.*` on the gathered logits), what the tests check:
- top-k ids: identical on tie-free logits. Ties are broken by the lowest global id (the order a
  stable sort gives). torch.topk's order among equal values is unspecified (its CPU kernel picks
  e.g. [8, 6, 7] of ten zeros), so with ties the ids may differ from the unsharded ones, but only
  among entries of equal value: the values, column by column, are the same. This rule does not
  depend on T; `compress` with group None (T = 1) applies it too, so runs with T = 1 and T > 1
  give the same payload bit for bit when both use this module.
- values: "logits" and full-vocabulary payloads bit-identical (the full vocabulary is gathered and
  handed to `wire.compress`); "logprobs" top-k differ from `compress` only by the order of
  the log-sum-exp's float32 additions (a few ulps before the wire rounding, mostly none after).
- samples: drawn by inverse CDF from the slices (float64 cumulative sums, one prefix per slice)
  with uniforms from `generator`, taken from TP rank 0 so the T ranks hold the same payload even
  if their generators differ. It is NOT the draw `sampling.sample_targets` makes with the same
  generator: torch.multinomial consumes the generator in its own, device-specific way and
  accumulates its CDF sequentially in float32 over the whole row, which no slice can reproduce.
  The draw is exact in distribution (each id with probability p_i up to float64 rounding of the
  cumulative sums), and the same ids for every T given the same generator (up to a uniform that
  lands within float64 rounding of a CDF boundary), including T = 1 through this module.
- losses and gradients: the same formulas on the same numbers, summed in another order: equal to
  about 1e-7 relative in float32.

A local slice reaching code that expects the whole vocabulary computes a wrong number without any
error (a softmax over V/T entries is a softmax). Three things prevent it: slices live in
`VocabSlice` (not a tensor), whose local tensor is tagged, and `wire.compress`,
`sampling.sample_targets` and every `losses.py` entry point refuse a VocabSlice, a tagged tensor
and a DTensor sharded along its last dimension; every payload made here or by `compress` carries
the vocabulary its ids index (`WireFormat.vocab`), and `losses.py` refuses a student of another
width, which is what catches an untagged [N, V/T] tensor with k < V/T, where no shape check can.

Collectives over tp per call (N tokens, V_t = V/T, all per-token and small except the first):
compress full vocabulary: one all-gather of [N, V_t] (`compress_rows`: one all-to-all of
[N/T, V_t] blocks instead); compress top-k: one all-gather of N x min(k, V_t) int64 candidates,
plus one [N] all-reduce for "logprobs" (the max is the top candidate); sample_targets: two [N]
all-reduces, an all-gather of [N] totals and of the [N, n] uniforms, one [N, n, 2] all-reduce;
gather_rows: one all-gather of the packed chunk; student losses: two [N] all-reduces for the
log-sum-exp, then per peer one all-reduce ([N, k+1] top-k, [N, n] samples, [N] full vocabulary,
which adds two [N] for the teacher's normalizer); cross_entropy: three; argmax: one [N, 2]
all-gather; VocabSlice without `bounds`: one all-gather of four numbers.

Every function takes the TP group as an argument (via `VocabSlice.group` for the student and
teacher sides): a `torch.distributed` process group (collectives through `codistill_ds.distributed.comm`),
None for T = 1 (no collective), or any `TPComm` (tests simulate T ranks with threads).
"""

from codistill_ds.exchange.vocab.slice import (
    GroupComm,
    TPComm,
    VocabSlice,
    chunk_bounds,
    gather_logits,
    tp_comm,
)
from codistill_ds.exchange.vocab.student import (
    argmax,
    cross_entropy,
    distill_loss,
    peer_distill_loss,
    top1_agreement,
)
from codistill_ds.exchange.vocab.teacher import (
    compress,
    compress_rows,
    gather_rows,
    global_topk,
    row_range,
    rows_chunk,
    sample_targets,
)

__all__ = [
    "GroupComm", "TPComm", "VocabSlice", "argmax", "chunk_bounds", "compress", "compress_rows",
    "cross_entropy", "distill_loss", "gather_logits", "gather_rows", "global_topk", "peer_distill_loss",
    "row_range", "rows_chunk", "sample_targets", "top1_agreement", "tp_comm",
]

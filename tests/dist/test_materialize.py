"""Replicas built sharded over their group: exact per-group initialization, and the memory it saves.

Two launches, side by side:
  M  tests/workers/materialize_check.py on 4 ranks = 2 groups x 2 (seed 11 + group): the CLI's
     ZeRO-3 and FSDP2 builds and the HF `zero3_init_in_group` hook (`from_config`,
     `from_pretrained`), each compared with an unsharded construction of the group's seed
  P  tests/workers/memory_check.py on 2 ranks = one group of S = 2: peak resident memory of
     building an 88M-parameter fp32 Llama (352 MB) sharded vs whole
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from launch import WORKERS, run_worker, torchrun

pytestmark = pytest.mark.timeout(600)


def memory_run(out) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun(2, [str(WORKERS / "memory_check.py"), str(out)], timeout=540,
                    MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the system
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("materialize")
    with ThreadPoolExecutor(2) as pool:
        m = pool.submit(run_worker, "materialize_check", 4, tmp / "M", timeout=540)
        p = pool.submit(memory_run, tmp / "P")
        return {"M": m.result(), "P": p.result()}


def test_every_group_equals_its_unsharded_construction(runs):
    """ZeRO-3 (fp32, and bf16 = the fp32 values rounded once), FSDP2 and the HF hook's
    `from_config` give each group exactly the weights of an unsharded build of its own seed;
    `from_pretrained` gives every group exactly the checkpoint. No NaN on any rank."""
    for r in runs["M"]:
        for key in ("zero3_diff", "zero3_bf16_diff", "fsdp_diff", "fsdp_logits_diff", "hf_config_diff",
                    "hf_pretrained_diff"):
            assert r[key] == 0.0, (r["rank"], key, r[key])
        assert r["zero3_bf16_dtypes"] == ["torch.bfloat16"]
        assert abs(r["hf_q_std"] - 0.02) < 0.004  # initializer_range: really initialized
    m = runs["M"]
    assert m[0]["checksum"] == m[1]["checksum"] != m[2]["checksum"] == m[3]["checksum"]


def test_partitions_are_half_of_every_parameter(runs):
    """Every parameter (not only the first) is split over the rank's own group of 2."""
    for r in runs["M"]:
        assert [local for local, _ in r["zero3_parts"]] == r["half_numel"]
        # Parenthesized (issue 24): `X == A if c else B` parses as `(X == A) if c else B`, which
        # asserted nothing for group 1.
        assert r["zero3_groups"] == ([[0, 1]] if r["group"] == 0 else [[2, 3]]), r["zero3_groups"]
        # FSDP2 rows: 257 vocabulary rows split 129 + 128 (the gathered branch), 32 rows 16 + 16.
        assert r["fsdp_embed_rows"] == (129 if r["rank"] % 2 == 0 else 128)
        assert r["fsdp_q_local_rows"] == 16


def test_checks_catch_one_bad_rank_or_parameter(runs):
    """A NaN on rank 3 alone stops every rank with the rank named; a model whose second
    parameter is partitioned over the world is refused (the old check looked at the first)."""
    for r in runs["M"]:
        assert "rank 3: model.embed_tokens.weight" in r["nan_caught"], r["nan_caught"]
        assert "first: 1.weight" in r["second_param_caught"] and "over 4 ranks" in r["second_param_caught"]


def test_sharded_build_peaks_near_half_of_the_whole(runs):
    """Measured here (88M parameters, S = 2): the whole model peaks at 352 MB; the ZeRO-3 and
    FSDP2 builds keep 177 MB (0.50) and peak at 227 MB (0.65): half the weights plus the
    largest module being initialized with its gather buffers. Asserted with a margin."""
    for r in runs["P"]:
        whole = r["whole"]["peak"]
        assert whole >= 0.95 * 4 * r["params"], r  # the weights dominate the whole build
        for kind in ("zero3", "fsdp"):
            m = r[kind]
            assert m["peak"] <= 0.72 * whole, (kind, m["peak"] / whole)
            # kept: 0.50 on every rank in most runs, 0.57 on one rank once (a full run of this
            # session); a build that kept the whole model is at 1.0
            assert m["kept"] <= 0.6 * whole, (kind, m["kept"] / whole)
            assert m["residue"] <= 0.05 * whole, (kind, m["residue"])
        print(f"\nrank {r['rank']}: whole {whole / 1e6:.0f} MB; " + "; ".join(
            f"{k} peak {r[k]['peak'] / 1e6:.0f} MB ({r[k]['peak'] / whole:.2f}), kept {r[k]['kept'] / 1e6:.0f} MB"
            for k in ("zero3", "fsdp")))

"""Model parallelism inside a group: TP + FSDP2/HSDP, DeepSpeed AutoTP, activation checkpointing.

One launch (real ranks, gloo, CPU): tests/workers/tp_suite.py on 4 ranks runs, one after the
other in each rank's process (a rank start costs more CPU than all of these checks):
  BLD  peak resident memory of building an 88M Llama with TP (K,1,1,2) and FSDP2 (K,1,2,1)
       through build_parallel_replica vs whole, K = 2 groups of S = 2 ranks, first (fresh process)
  TP   meshes (K,R,D,T) = (2,1,1,2), (1,1,2,2), (1,2,1,2), (2,2,1,1) against the unsharded
       same-seed model on the group's whole batch; DCP round trip, exact resume, export;
       activation checkpointing "full"/"selective" on two meshes
  ATP  AutoTP + ZeRO-1 with per-group groups, and DeepSpeed's default grouping, which must be
       refused
  MEM  peak resident memory of a step, one activation-checkpointing mode per process (ranks 0-2)
The unit tests at the end need no process group.
"""

from __future__ import annotations

import json

import pytest
import torch

from launch import WORKERS, torchrun

pytestmark = pytest.mark.timeout(1200)

TOL = 1e-6
MAX_NORM = 0.5  # tp_check.py / autotp_check.py


def _runs(results: list[dict], ac: str | None = None) -> list[tuple[int, dict]]:
    return [(r["rank"], run) for r in results for run in r["runs"] if ac is None or run.get("ac") == ac]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> list[dict]:
    """The module's one launch (tests/workers/tp_suite.py); each fixture below is its part."""
    out = tmp_path_factory.mktemp("tp_suite")
    proc = torchrun(4, [str(WORKERS / "tp_suite.py"), str(out)], timeout=1100,
                    MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the system
    assert proc.returncode == 0, f"tp_suite failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.fixture(scope="module")
def tp(suite):
    return [r["tp"] for r in suite]


@pytest.fixture(scope="module")
def autotp(suite):
    return [r["autotp"] for r in suite]


@pytest.fixture(scope="module")
def ac_memory(suite):
    return {r["ac"]["mode"]: r["ac"] for r in suite if r["ac"] is not None}


@pytest.fixture(scope="module")
def build_memory(suite):
    return [r["build"] for r in suite]


# ---- TP + FSDP2 / HSDP -----------------------------------------------------------------------------

def test_training_equals_unsharded_reference(tp):
    """Two AdamW steps with clipping active: loss, clip norm, gradients (after clipping) and
    parameters equal the unsharded same-seed model on the group's batch; init exactly equal."""
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "norm": 0.0}
    for rank, run in _runs(tp, "none"):
        where = (rank, run["shape"])
        assert run["init_diff"] == 0.0, where
        assert min(run["ref_norm"]) > MAX_NORM, where  # clipping really acts
        for ours, ref in zip(run["loss"], run["ref_loss"]):
            assert abs(ours - ref) <= TOL, (where, ours, ref)
            worst["loss"] = max(worst["loss"], abs(ours - ref))
        for ours, ref in zip(run["norm"], run["ref_norm"]):
            assert abs(ours - ref) <= TOL * ref, (where, ours, ref)
            worst["norm"] = max(worst["norm"], abs(ours - ref))
        assert max(run["grad_diff"]) <= TOL, (where, run["grad_diff"])
        assert max(run["param_diff"]) <= TOL, (where, run["param_diff"])
        worst["grad"] = max(worst["grad"], max(run["grad_diff"]))
        worst["param"] = max(worst["param"], max(run["param_diff"]))
    print(f"\nTP+FSDP vs unsharded, worst over 4 meshes x 4 ranks: {worst}")


def test_groups_train_distinct_replicas(tp):
    """K = 2: the two groups' weights differ (seeds 5 and 6); inside a group they agree."""
    for shape in ([2, 1, 1, 2], [2, 2, 1, 1], [1, 1, 2, 2], [1, 2, 1, 2]):
        sums = {}
        for _, run in _runs(tp, "none"):
            if run["shape"] == shape:
                sums.setdefault(run["group"], set()).add(run["checksum"])
        assert all(len(v) == 1 for v in sums.values()), (shape, sums)
        assert len(sums) == shape[0], (shape, sums)
        if shape[0] == 2:
            assert sums[0] != sums[1], shape


def test_each_rank_holds_only_its_shards(tp):
    """A q_proj matrix is split over D*T ranks (replicated over R); logits are vocab-sharded
    DTensors when T > 1, and the local slice [N, V/T] at offset t*V/T equals the reference's."""
    for rank, run in _runs(tp, "none"):
        _K, _R, D, T = run["shape"]
        assert run["q_local_numel"] * D * T == run["q_numel"], (rank, run["shape"], run["q_local_numel"])
        assert run["logits_is_dtensor"] == (T > 1)
        assert run["slice_width"] == 64 // T and run["slice_offset"] == run["tp_rank"] * 64 // T
        assert run["slice_diff"] <= TOL, (rank, run["shape"], run["slice_diff"])


def test_dcp_round_trip_and_exact_resume(tp):
    """DCP save over the group -> load into a replica of another seed: parameters, AdamW moments
    and step counts exactly equal; step 3 after the load equals step 3 without it bit for bit."""
    for rank, run in _runs(tp, "none"):
        where = (rank, run["shape"])
        assert run["fresh_differs"], where
        assert run["dcp_param_diff"] == 0.0 and run["dcp_optim_diff"] == 0.0 and run["dcp_steps_equal"], where
        assert run["resume_param_diff"] == 0.0, where
        assert run["resume_loss"] == run["resume_loss_resumed"], where
        assert abs(run["resume_loss"] - run["step3_ref_loss"]) <= TOL, where
        assert run["step3_ref_param_diff"] <= TOL, where


def test_export_loads_with_from_pretrained(tp):
    """The streamed export (several safetensors files + index) and the offline export from DCP
    (fp32, and bf16 = the fp32 values rounded once) load with `from_pretrained`; weights exactly
    the trained ones, logits equal."""
    leaders = [(rank, run) for rank, run in _runs(tp, "none") if "export_param_diff" in run]
    assert len(leaders) == 6  # one writer per group: 2 + 1 + 1 + 2
    for rank, run in leaders:
        where = (rank, run["shape"])
        assert len(run["export_files"]) > 1, where
        assert run["export_param_diff"] == 0.0 and run["export_dcp_param_diff"] == 0.0, where
        assert run["export_bf16_dtypes"] == ["torch.bfloat16"] and run["export_bf16_diff"] == 0.0, where
        assert run["export_logits_diff"] <= TOL, (where, run["export_logits_diff"])
        assert run["export_ref_logits_diff"] <= 1e-5, (where, run["export_ref_logits_diff"])


def test_fsdp_options_run(tp):
    """bf16 compute (bf16 logits, loss within bf16 rounding), CPU offload and no reshard after
    forward (both exact) on (2,1,1,2)."""
    for r in tp:
        o = r["options"]
        assert o["bf16"]["logits_dtype"] == "torch.bfloat16" and abs(o["bf16"]["loss"] - o["ref_loss"]) < 2e-2
        for name in ("offload", "no_reshard"):
            assert abs(o[name]["loss"] - o["ref_loss"]) <= TOL and abs(o[name]["norm"] - o["ref_norm"]) <= TOL, name


def test_build_never_holds_the_whole_model(build_memory):
    """Measured here (88M parameters, fp32, S = 2): the whole build peaks at 353 MB; TP over 2
    ranks peaks at ~241 MB (0.68) and keeps ~179 MB (0.51), FSDP2 ~227 MB (0.64) / 177 MB: the
    ZeRO-3 build's peak, since each ZeRO partition is freed as its TP/FSDP shard is cut. The
    bound on the peak is 0.85 of the whole (measured once 0.755 under a loaded full suite); a
    build that held the whole model peaks at 1.0 or more."""
    for r in build_memory:
        whole = r["whole"]["peak"]
        assert whole >= 0.95 * 4 * r["params"], r
        for kind in ("tp", "fsdp"):
            m = r[kind]
            assert m["peak"] <= 0.85 * whole, (kind, m["peak"] / whole)
            assert m["kept"] <= 0.55 * whole, (kind, m["kept"] / whole)
            assert m["residue"] <= 0.05 * whole, (kind, m["residue"])
        print(f"\nrank {r['rank']}: whole {whole / 1e6:.0f} MB; " + "; ".join(
            f"{k} peak {r[k]['peak'] / 1e6:.0f} MB ({r[k]['peak'] / whole:.2f}), kept {r[k]['kept'] / 1e6:.0f} MB"
            for k in ("tp", "fsdp")))


def test_activation_checkpointing_same_numbers(tp):
    """"full" and "selective" give the losses, norms, gradients and parameters of "none"."""
    base = {(rank, tuple(run["shape"])): run for rank, run in _runs(tp, "none")}
    checked = 0
    for ac in ("full", "selective"):
        for rank, run in _runs(tp, ac):
            ref = base[(rank, tuple(run["shape"]))]
            for key in ("loss", "norm"):
                assert max(abs(a - b) for a, b in zip(run[key], ref[key])) <= TOL, (rank, ac, key)
            assert max(run["grad_diff"]) <= TOL and max(run["param_diff"]) <= TOL, (rank, ac)
            checked += 1
    assert checked == 16


def test_activation_checkpointing_peak_memory(ac_memory):
    """Measured here (8 layers, 4 x 128 tokens, fp32): peak above the baseline ~111 MB without,
    ~37 MB with "full" (0.34), ~74 MB with "selective" every other layer (0.67); the same loss
    and gradients in every mode."""
    none, full, sel = (ac_memory[m] for m in ("none", "full", "selective"))
    assert full["wrapped"] == list(range(8)) and sel["wrapped"] == [1, 3, 5, 7] and none["wrapped"] == []
    for m in (full, sel):
        assert abs(m["loss"] - none["loss"]) <= TOL
        assert abs(m["grad_checksum"] - none["grad_checksum"]) <= TOL * none["grad_checksum"]
    assert full["peak_above_baseline"] < 0.5 * none["peak_above_baseline"]
    assert full["peak_above_baseline"] < sel["peak_above_baseline"] < 0.85 * none["peak_above_baseline"]
    print("\npeak RSS above baseline: " + ", ".join(
        f"{m} {ac_memory[m]['peak_above_baseline'] / 1e6:.1f} MB ({ac_memory[m]['step_s']:.1f} s)"
        for m in ("none", "full", "selective")))


# ---- DeepSpeed AutoTP ---------------------------------------------------------------------------------

def _expected_dp_ranks(shape: list[int], rank: int) -> list[int]:
    _K, R, D, T = shape
    S = R * D * T
    g, t = rank // S, rank % T
    return [g * S + a * T + t for a in range(R * D)]


def test_autotp_groups_are_the_groups_own(autotp):
    """Every data-parallel group DeepSpeed uses (engine, ZeRO-1 partitions) is my group's DP
    ranks, every TP group (engine, AutoTP layers) my T consecutive ranks."""
    for r in autotp:
        rank = r["rank"]
        for run in r["runs"]:
            T = run["shape"][3]
            dp = _expected_dp_ranks(run["shape"], rank)
            tp_ranks = list(range(rank // T * T, rank // T * T + T))
            assert run["dp_world_size"] == len(dp)
            for what, ranks in run["groups"].items():
                want = tp_ranks if ("tensor_model" in what or "model_parallel" in what or "mp_group" in what) else dp
                assert ranks == want, (rank, run["shape"], what, ranks, want)
            assert any("mp_group" in k for k in run["groups"])  # AutoTP did split layers
            assert run["q_local_shape"] == [32 // T, 32]


def test_autotp_trains_like_the_reference(autotp):
    """Losses of two ZeRO-1 + AutoTP steps with clipping active, DeepSpeed's gradient norm and
    the logits afterwards equal the unsharded same-seed model on the group's batch."""
    for r in autotp:
        for run in r["runs"]:
            where = (r["rank"], run["shape"])
            assert min(run["ref_norm"]) > MAX_NORM, where
            assert max(abs(a - b) for a, b in zip(run["loss"], run["ref_loss"])) <= TOL, where
            assert max(abs(a - b) / b for a, b in zip(run["norm"], run["ref_norm"])) <= TOL, (where, run["norm"])
            assert run["logits_diff"] <= TOL, (where, run["logits_diff"])
            assert run["logits_shape"] == [2, 16, 64]
    losses = {r["runs"][0]["group"]: r["runs"][0]["loss"][0] for r in autotp}
    assert losses[0] != losses[1]  # two groups, two replicas


def test_autotp_default_grouping_is_refused(autotp):
    """With DeepSpeed's own grouping (the fix disabled) the data-parallel group spans the two
    codistillation groups (ranks t and t + 2): the check refuses to run and names it."""
    for r in autotp:
        rank, d = r["rank"], r["default"]
        assert d["refused"], rank
        cross = sorted({rank % 2, rank % 2 + 2})
        assert f"engine.data_parallel_group is ranks {cross}" in d["message"], d["message"]
        assert "ZeRO dp_process_group" in d["message"]


# ---- no process group needed ----------------------------------------------------------------------------

def _llama_config(**kw):
    from transformers import LlamaConfig

    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": False}
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("kw, field, numbers", [
    ({"num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 36}, "model.num_heads", "num_attention_heads = 6"),
    ({"num_key_value_heads": 2}, "model.num_kv_heads", "num_key_value_heads = 2"),
    ({"intermediate_size": 66}, "model.intermediate_size", "intermediate_size = 66"),
    ({"vocab_size": 65}, "data.tokenizer", "vocab_size = 65"),
])
def test_check_tp_divisible_names_the_field(kw, field, numbers):
    from codistill_ds.backends.tensor_parallel import check_tp_divisible
    from codistill_ds.config import ConfigError

    T = 4
    with pytest.raises(ConfigError) as err:
        check_tp_divisible(_llama_config(**{"num_attention_heads": 8, "num_key_value_heads": 4, **kw}), T)
    assert err.value.field == field, err.value
    assert numbers in str(err.value) and "parallel.tp = 4" in str(err.value)
    check_tp_divisible(_llama_config(), 2)  # the test model divides by 2


def test_gpt2_and_tied_embeddings_are_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    from codistill_ds.backends.tensor_parallel import (
        TensorParallelUnsupported,
        apply_tensor_parallel,
    )

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=None, eos_token_id=None))
        tied = AutoModelForCausalLM.from_config(_llama_config(tie_word_embeddings=True))
    with pytest.raises(TensorParallelUnsupported, match="fused Conv1D.*model.arch: llama"):
        apply_tensor_parallel(gpt2, tp_mesh=None)
    with pytest.raises(TensorParallelUnsupported, match="tie_word_embeddings"):
        apply_tensor_parallel(tied, tp_mesh=None)


def test_activation_checkpointing_modes_wrap_the_right_layers():
    from transformers import AutoModelForCausalLM

    from codistill_ds.backends.activation_checkpointing import (
        apply_activation_checkpointing,
        checkpointed_layers,
    )

    def model():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(_llama_config(num_hidden_layers=4))

    assert checkpointed_layers(apply_activation_checkpointing(model(), "none")) == []
    assert checkpointed_layers(apply_activation_checkpointing(model(), "full")) == [0, 1, 2, 3]
    m = apply_activation_checkpointing(model(), "selective")
    assert checkpointed_layers(m) == [1, 3]
    assert "model.layers.1.self_attn.q_proj.weight" in m.state_dict()  # state dicts keep HF names
    with pytest.raises(ValueError, match="none"):
        apply_activation_checkpointing(model(), "some")

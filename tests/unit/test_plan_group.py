"""`codistill-ds plan --tp/--replicate/...`: the section inside each group, by hand and against the
collectives a real TP/FSDP2/HSDP Llama issues (counted on torch's fake process group)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from codistill_ds.commands.plan import add_plan_arguments, run_plan
from codistill_ds.plan.bytes import make_plan
from codistill_ds.plan.group import format_group, group_plan
from codistill_ds.plan.memory import memory_plan, tp_params
from codistill_ds.plan.traffic import group_traffic, leaving_node, tp_all_reduces
from codistill_ds.plan.units import human_bytes
from launch import REPO, child_env


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return parser.parse_args(argv)


def small(**kw):
    """P = 1,000,000, V = 1,000, h = 100, n = 4, L = 10, 2 groups x 8 ranks on nodes of 4 GPUs,
    exchange 4 sequences x 10 tokens of top-8 bf16 + uint16 (32 B per position) every 5 steps."""
    plan = make_plan(1_000_000, 1000, 10, 4, 8, 5, groups=2, world=16, gpus_per_node=4)
    args = {"tp": 2, "gpus_per_node": 4, "activation_checkpointing": "full", "grad_accum": 3, "heads": 4,
            "kv_heads": 2, "intermediate": 400}
    return plan, group_plan(plan, 2, 100, 4, **{**args, **kw})


def test_tp2_fsdp4_full_checkpointing_by_hand():
    """T = 2, R = 1: S = 8 = 1 x D 4 x T 2, A = 4 data ranks, b = 2, m = 3 micro-steps.

    P_t = (P - (2n + 1) h) / T + (2n + 1) h = (1,000,000 - 900) / 2 + 900 = 500,450
    model states 16 P_t / D = 16 x 500,450 / 4 = 2,001,800; gathered 2 x 2 P_t / n = 500,450
    L b h = 10 x 2 x 100 = 2,000; a_layer = 2,000 x (10 + 24 / 2) = 44,000; logits 10 b L V / T =
    10 x 2 x 10 x 1,000 / 2 = 100,000
      none       4 x 44,000 + 100,000                                 = 276,000
      full       4 x 2 x 2,000 + 44,000 (one layer rebuilt) + 100,000  = 160,000
      selective  2 x 44,000 + 2 x 4,000 + 44,000 + 100,000             = 240,000
    total (full) 2,001,800 + 500,450 + 160,000 = 2,662,250; build 4 P_t / D + 4 max(V h, P / n) =
    500,450 + 4 x 250,000 = 1,500,450; tokens per step 2 x 10 x (16 / 2) x 3 = 480
    TP: 7 x 4 + 2 + 4 = 34 all-reduces of M = 2 b L h = 4,000 B; per GPU 3 x 34 x 2 x 1/2 x 4,000
      = 408,000 B, all inside a node (TP pairs 2d, 2d + 1)
    FSDP per GPU: all-gather 3 x 2 x 3/4 x 2 x 500,450 = 4,504,050; reduce-scatter (fp32)
      3 x 3/4 x 4 x 500,450 = 4,504,050. Nodes of 4: positions 0-3 and 4-7, each dp_shard ring
      {t, 2 + t, 4 + t, 6 + t} spans both, 2 rings (t = 0, 1) leave each node: 2 x 4,504,050 =
      9,008,100 per collective, 18,016,200 in all, 4,504,050 per GPU of 4
    cross-group: (K - 1) payload / I = 4 x 10 x 32 / 5 = 256 leaving a group, 256 / 8 = 32 per GPU"""
    _, gp = small()
    m, t = gp.memory, gp.traffic
    assert (gp.dp_shard, gp.data_size, gp.checkpointed_layers) == (4, 4, 4)
    assert m.local_params == 500_450 == tp_params(1_000_000, 100, 4, 2)
    assert (m.model_state_bytes, m.gathered_bytes) == (2_001_800, 500_450)
    assert m.activations == {"none": 276_000, "full": 160_000, "selective": 240_000}
    assert m.activation_bytes == 160_000 and m.total_bytes == 2_662_250
    assert (m.build_peak_bytes, m.tokens_per_step) == (1_500_450, 480)
    assert (t.tp_all_reduces, t.tp_message_bytes, t.tp_bytes_per_gpu) == (34, 4_000, 408_000)
    gather, scatter = t.collectives
    assert (gather["ranks"], gather["per_gpu"], gather["leaving_node"]) == (4, 4_504_050, 9_008_100)
    assert (scatter["ranks"], scatter["per_gpu"], scatter["leaving_node"]) == (4, 4_504_050, 9_008_100)
    assert t.leaving_node_bytes == 18_016_200 and t.leaving_node_bytes_per_gpu == 4_504_050
    assert (gp.cross_group_leaving_group_per_step, gp.cross_group_per_gpu_per_step) == (256, 32)


def test_cross_group_bytes_do_not_depend_on_t():
    """The rows each TP rank sends (exchange/vocab's row_range, the wire format's payload bytes)
    add up to the T = 1 payload: 4 sequences over A data ranks, 10 positions each, 32 B per row."""
    from codistill_ds.exchange.vocab.teacher import row_range
    from codistill_ds.exchange.wire import WireFormat

    fmt = WireFormat.choose(8, 1000, "bf16")
    for tp in (1, 2, 4, 8):
        plan, gp = small(tp=tp, gpus_per_node=8, intermediate=None, heads=None, kv_heads=None)
        data_size = 8 // tp
        rows = 4 // data_size * 10 if data_size <= 4 else None
        if rows is None:
            continue
        sent = [fmt.payload_bytes(len(row_range(rows, t, tp))) for t in range(tp)]
        assert sum(sent) * data_size == plan.payload_bytes_per_group == 1280
        assert gp.cross_group_per_gpu_per_step == pytest.approx(max(sent) / 5) == 32
        assert gp.cross_group_leaving_group_per_step == plan.boundary["codistill"] == 256


def test_hsdp_by_hand():
    """R = 2, T = 2, D = 2 on nodes of 4: one replica (D T = 4 positions) per node.
    states 16 P_t / D = 16 x 500,450 / 2 = 4,003,600 (HSDP keeps R copies: D, not R D, divides).
    dp_shard rings {(2r + d) 2 + t} stay in node r: nothing leaves. Replicate rings, 4 per group
    ((d, t)), span both nodes: all-reduce of the fp32 shard 2 x 1/2 x 4 x 500,450 / 2 = 1,000,900
    per GPU, 4 x 1,000,900 = 4,003,600 leaving a node. All-gather per GPU 2 x 1/2 x 2 x 500,450 =
    1,000,900; reduce-scatter 1/2 x 4 x 500,450 = 1,000,900."""
    _, gp = small(replicate=2, activation_checkpointing="none", grad_accum=1)
    assert (gp.dp_shard, gp.data_size) == (2, 4)
    assert gp.memory.model_state_bytes == 4_003_600
    gather, scatter, hsdp = gp.traffic.collectives
    assert (gather["per_gpu"], gather["leaving_node"]) == (1_000_900, 0)
    assert (scatter["per_gpu"], scatter["leaving_node"]) == (1_000_900, 0)
    assert (hsdp["axis"], hsdp["ranks"], hsdp["per_gpu"], hsdp["leaving_node"]) == ("replicate", 2, 1_000_900, 4_003_600)
    assert gp.traffic.leaving_node_bytes == 4_003_600
    assert "HSDP" in gp.sharding


@pytest.mark.parametrize("stage, states, per_gpu", [
    # ZeRO-1: 4 P_t + 12 P_t / A = 2,001,800 + 1,501,350; all-reduce 2 x 3/4 x 2 P_t + all-gather 3/4 x 2 P_t
    (1, 3_503_150, (1_501_350, 750_675)),
    # ZeRO-2: 2 P_t + 14 P_t / A = 1,000,900 + 1,751,575; reduce-scatter 3 x 3/4 x 2 P_t per micro-step
    (2, 2_752_475, (3 * 750_675, 750_675)),
])
def test_zero12_autotp_by_hand(stage, states, per_gpu):
    """DeepSpeed ZeRO-1/2 + AutoTP, T = 2, A = 4: the optimizer (and ZeRO-2's gradients) sharded
    over the data-parallel ranks, bf16 parameters whole per TP rank (nothing gathered), built
    whole (4 P); the data-parallel rings {t, 2 + t, 4 + t, 6 + t} span both nodes of 4."""
    _, gp = small(zero_stage=stage)
    assert gp.memory.model_state_bytes == states and gp.memory.gathered_bytes == 0
    assert gp.memory.build_peak_bytes == 4_000_000
    assert tuple(c["per_gpu"] for c in gp.traffic.collectives) == per_gpu
    assert gp.traffic.leaving_node_bytes == 2 * sum(per_gpu)
    assert any("AutoTP gathers the logits" in n for n in gp.notes)


def test_leaving_node_counts_rings_across_nodes():
    # three rings on nodes of 2: [0, 1] inside node 0; [2, 4] and [3, 5] span nodes 1 and 2
    assert leaving_node([[0, 1], [2, 4], [3, 5]], 10.0, 2) == 20.0
    assert leaving_node([[0, 1], [2, 3]], 10.0, 2) == 0.0
    # the 70B layout by closed form: 8 dp_shard rings (one per TP rank) cross every node boundary
    t = group_traffic(64, 2, 8, 1, 8, 3, 1e9, 1, 8192, 8192, 80, 80)
    assert t.collectives[0]["leaving_node"] == pytest.approx(8 * 2 * 3 / 4 * 2e9)
    assert t.tp_all_reduces == 7 * 80 + 2 + 80


def test_t1_r1_reproduces_todays_output(capsys):
    """No group flag: the output is today's. --tp 1 --replicate 1: today's output, then the group
    section, whose memory figures are the old memory_plan's."""
    argv = ["--params", "953223168", "--seq-len", "2048", "--batch", "8", "--topk", "32", "--interval", "16",
            "--world", "16", "--micro-batch", "4", "--hidden", "2048", "--layers", "16"]
    assert run_plan(parse(argv)) == 0
    before = capsys.readouterr().out
    assert "inside each group" not in before and "16 P / S" in before
    assert run_plan(parse([*argv, "--tp", "1", "--replicate", "1"])) == 0
    after = capsys.readouterr().out
    assert after.startswith(before) and "inside each group" in after[len(before):]
    old = memory_plan(953223168, 16, 2, 4, 2048, 2048, 16, 32000)
    gp = group_plan(make_plan(953223168, 32000, 2048, 8, 32, 16, 2, 16), 4, 2048, 16)
    for name in ("model_state_bytes", "gathered_bytes", "activation_bytes", "build_peak_bytes", "tokens_per_step"):
        assert getattr(gp.memory, name) == getattr(old, name), name
    assert gp.traffic.tp_bytes_per_gpu == 0 and gp.traffic.leaving_node_bytes == 0  # one group per node
    assert "tensor parallel" not in "\n".join(format_group(gp, human_bytes))


@pytest.mark.parametrize("argv, words", [
    (["--tp", "3"], ["--heads", "32", "--tp 3"]),
    (["--tp", "2", "--vocab", "32001"], ["--vocab", "32,001"]),
    (["--tp", "4", "--gpus-per-node", "2"], ["tp 4", "--gpus-per-node 2", "span nodes"]),
    (["--tp", "16"], ["group of 8 ranks", "parallel.tp 16"]),
    (["--replicate", "2", "--zero-stage", "1"], ["replicate 2", "ZeRO-1"]),
    (["--tp", "2", "--replicate", "3"], ["replicate 3", "tp 2"]),
    (["--gpus-per-node", "5"], ["16", "gpus_per_node=5"]),
])
def test_impossible_layouts_return_2(argv, words, capsys):
    base = ["--world", "16", "--micro-batch", "1", "--hidden", "64", "--layers", "2", "--heads", "32"]
    assert run_plan(parse([*base, *argv])) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err


def test_group_flags_need_the_shape(capsys):
    assert run_plan(parse(["--tp", "2"])) == 2
    assert "--micro-batch, --hidden and --layers" in capsys.readouterr().err


def test_json_has_the_group(capsys):
    argv = ["--params", "1B", "--world", "16", "--micro-batch", "1", "--hidden", "64", "--layers", "2",
            "--tp", "2", "--activation-checkpointing", "selective", "--json"]
    assert run_plan(parse(argv)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["group"]["tp"] == 2 and data["group"]["traffic"]["tp_all_reduces"] == 7 * 2 + 2 + 1
    assert data["memory"]["mode"] == "selective" and set(data["memory"]["activations"]) == {"none", "full", "selective"}


SPECS = [
    {"R": 1, "D": 2, "T": 2, "layers": 2, "ac": "none", "b": 3, "L": 8},
    {"R": 1, "D": 2, "T": 2, "layers": 3, "ac": "full", "b": 3, "L": 8},
    {"R": 1, "D": 2, "T": 2, "layers": 3, "ac": "selective", "b": 2, "L": 4},
    {"R": 2, "D": 2, "T": 1, "layers": 2, "ac": "none", "b": 3, "L": 8},
    {"R": 2, "D": 1, "T": 2, "layers": 2, "ac": "full", "b": 1, "L": 8},
]


@pytest.fixture(scope="module")
def counted():
    out = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "plan_comm_count.py"), json.dumps(SPECS)],
                         capture_output=True, text=True, timeout=240, check=True, cwd=REPO, env=child_env())
    return json.loads(out.stdout)


@pytest.mark.parametrize("i", range(len(SPECS)))
def test_traffic_formulas_equal_the_collectives_of_a_real_model(counted, i):
    """What one rank of a TP/FSDP2/HSDP Llama (vocab 64, hidden 32) issues in one forward +
    backward (loss_parallel CE), summed with the ring factors, is what the plan prints per GPU."""
    spec, got = SPECS[i], counted[i]
    R, D, T, n = spec["R"], spec["D"], spec["T"], spec["layers"]
    calls = got["forward"] + got["backward"]
    c = {"none": 0, "full": n, "selective": n // 2}[spec["ac"]]
    local = tp_params(got["params"], got["hidden"], n, T)
    t = group_traffic(2 * R * D * T, 2, T, R, R * D * T, 3, local, spec["b"], spec["L"], got["hidden"], n, c)
    tp = [b for op, b, dt in calls if "all_reduce" in op and "functional" in op]
    assert len(tp) == (tp_all_reduces(n, c) if T > 1 else 0)
    assert set(tp) <= {2 * spec["b"] * spec["L"] * got["hidden"]}  # M = 2 b L h, bf16
    assert t.tp_bytes_per_gpu == pytest.approx(sum(tp) * 2 * (T - 1) / T)

    def ring(kind: str, size: int, factor: int) -> float:
        return sum(b for op, b, _ in calls if op == kind) * factor * (size - 1) / size

    per_gpu = {x["name"].split(" of ")[0]: x["per_gpu"] for x in t.collectives}
    if D > 1:  # FSDP2 gathers nothing over one shard
        assert sum(b for op, b, _ in calls if op == "_allgather_base_") == 2 * 2 * local  # bf16, forward + backward
    assert per_gpu["all-gather"] == pytest.approx(ring("_allgather_base_", D, 1))
    assert per_gpu["reduce-scatter"] == pytest.approx(ring("_reduce_scatter_base_", D, 1))
    if R > 1:  # the fp32 gradient shard, P_t / D in all
        assert sum(b for op, b, _ in calls if op == "allreduce_") == 4 * local / D
        assert per_gpu["HSDP all-reduce"] == pytest.approx(ring("allreduce_", R, 2))
    else:
        assert not any(op == "allreduce_" for op, _, _ in calls)

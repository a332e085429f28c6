"""`codistill-ds plan`: byte formulas against hand-computed numbers, flags, exit codes."""

from __future__ import annotations

import argparse
import json

import pytest

from codistill_ds.commands.plan import add_plan_arguments, run_plan
from codistill_ds.plan.bytes import make_plan
from codistill_ds.plan.format import format_plan
from codistill_ds.plan.units import human_bytes, parse_count


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return parser.parse_args(argv)


def test_small_case_by_hand():
    # 2 groups x 2 ranks, 4 sequences x 8 tokens, top-10 in bf16 (2 B) + uint16 ids (2 B).
    p = make_plan(
        params=1000, vocab=100, seq_len=8, batch=4, topk=10, interval=5, groups=2, world=4
    )
    assert p.wire["value_dtype"] == "bf16" and p.wire["index_dtype"] == "uint16"
    assert p.wire_bytes_per_position == 10 * (2 + 2) and p.ranks_per_group == 2
    assert p.payload_bytes_per_group == 4 * 8 * 10 * 4 == 1280
    assert p.exchange_bytes_per_exchange == 2 * 1 * 1280
    assert p.exchange_bytes_per_step == 2 * 1280 / 5
    assert p.ring_all_ranks_bytes_per_step == 2 * 3 * 1000 * 2  # every rank summed: not a baseline
    assert p.leader_bytes_per_exchange == 1280  # the whole group's payload to 1 peer
    assert p.rail_bytes_per_exchange == 640  # half of it per rank
    assert p.boundary["codistill"] == 1280 / 5
    assert p.boundary["ring"] == 2 * 3 / 4 * 2 * 1000
    assert p.ratio == p.ratios["ring"] == pytest.approx(3000 / 256)
    assert p.layout == [
        {"group": 0, "ranks": [0, 1], "leader": 0},
        {"group": 1, "ranks": [2, 3], "leader": 2},
    ]


def test_full_vocab_three_groups_fp32_by_hand():
    p = make_plan(params=500, vocab=50, seq_len=4, batch=2, topk=0, interval=1, groups=3,
                  world=6, dtype="fp32", grad_dtype="fp32")
    assert p.wire["index_dtype"] is None and p.wire["k"] == 50  # no ids
    assert p.payload_bytes_per_group == 2 * 4 * 50 * 4 == 1600
    assert p.exchange_bytes_per_exchange == 3 * 2 * 1600 == 9600
    assert p.ring_all_ranks_bytes_per_step == 2 * 5 * 500 * 4 == 20000
    assert p.leader_bytes_per_exchange == 2 * 1600
    assert p.rail_bytes_per_exchange == 2 * 1600 / 2
    assert p.boundary["codistill"] == 2 * 1600
    assert [e["leader"] for e in p.layout] == [0, 2, 4]
    assert p.layout[2]["ranks"] == [4, 5]


def test_one_billion_on_two_nodes_of_eight_by_hand():
    """1B params, 2 nodes x 8 ranks, 16 x 2048 tokens per group per step, top-32 bf16 + uint16."""
    p = make_plan(10**9, 32000, 2048, 16, 32, 1, groups=2, world=16)
    tokens = 16 * 2048
    codistill = 1 * 16 * 2048 * 32 * (2 + 2)  # (K-1) B L k (v + i) = 4,194,304 B
    expected = {
        "codistill": codistill,
        "ring": 2 * 15 / 16 * 2 * 10**9,  # 3.75 GB on each direction of the node boundary
        "hierarchical": 2 * 1 / 2 * 2 * 10**9,  # 2 GB
        "zero3": 3 * 15 / 16 * 2 * 10**9,  # 2 all-gathers + 1 reduce-scatter: 5.625 GB
        "diloco_fp32": 2 * 1 / 2 * 4 * 10**9 / 500,  # 8 MB per step
        "diloco_bf16": 2 * 1 / 2 * 2 * 10**9 / 500,  # 4 MB
        "streaming_diloco": 2 * 1 / 2 * 0.5 * 10**9 / 100,  # 5 MB
    }
    for name, value in expected.items():
        assert p.boundary[name] == pytest.approx(value), name
        assert p.per_token[name] == pytest.approx(value / tokens), name
    assert p.per_token["codistill"] == 128.0 and p.per_token["ring"] == pytest.approx(114_440.9, abs=0.1)
    assert p.ratios["ring"] == pytest.approx(3.75e9 / 4_194_304)  # 894x, not the summed 7,153x
    assert p.ratios["hierarchical"] == pytest.approx(2e9 / 4_194_304)  # 477x
    assert p.ratios["diloco_bf16"] == pytest.approx(4e6 / 4_194_304)
    # crossover: 4,194,304 B = 2 (K-1)/K b P / H  ->  P = 4,194,304 x 500 / (1 x 4) for fp32
    assert p.cheaper_than_diloco_above_params["diloco_fp32"] == pytest.approx(4_194_304 * 500 / 4)
    assert p.cheaper_than_diloco_above_params["diloco_bf16"] == pytest.approx(4_194_304 * 500 / 2)
    assert p.cheaper_than_diloco_above_params["streaming_diloco"] == pytest.approx(4_194_304 * 100 / 0.5)
    assert p.streaming_diloco_paper_bytes_per_token == pytest.approx(44.2)


def test_seven_billion_on_four_nodes_of_eight_by_hand():
    p = make_plan(7 * 10**9, 32000, 2048, 16, 32, 1, groups=4, world=32)
    codistill = 3 * 16 * 2048 * 32 * 4  # each group sends its payload to 3 peers: 12.58 MB
    assert p.boundary["codistill"] == codistill
    assert p.boundary["ring"] == pytest.approx(2 * 31 / 32 * 2 * 7e9)  # 27.125 GB
    assert p.boundary["hierarchical"] == pytest.approx(2 * 3 / 4 * 2 * 7e9)  # 21 GB
    assert p.boundary["zero3"] == pytest.approx(3 * 31 / 32 * 2 * 7e9)  # 40.69 GB
    assert p.boundary["diloco_fp32"] == pytest.approx(2 * 3 / 4 * 4 * 7e9 / 500)  # 84 MB
    assert p.boundary["diloco_bf16"] == pytest.approx(2 * 3 / 4 * 2 * 7e9 / 500)  # 42 MB
    assert p.boundary["streaming_diloco"] == pytest.approx(2 * 3 / 4 * 0.5 * 7e9 / 100)  # 52.5 MB
    assert p.per_token["codistill"] == 3 * 128
    assert p.ratios["ring"] == pytest.approx(27.125e9 / codistill)  # 2,156x
    assert p.ratios["diloco_fp32"] == pytest.approx(84e6 / codistill)
    assert p.cheaper_than_diloco_above_params["diloco_fp32"] == pytest.approx(codistill * 500 / 6)


def test_compact_wire_and_token_fraction_by_hand():
    # top-1 fp8 + uint16 + 1 scale byte = 4 B per position; a quarter of 2048 positions sent.
    p = make_plan(10**9, 32000, 2048, 16, 1, 1, 2, 16, dtype="fp8", token_fraction=0.25)
    assert p.wire_bytes_per_position == 1 * (1 + 2) + 1 and p.positions_per_sequence == 512
    assert p.payload_bytes_per_group == 16 * 512 * 4
    assert p.per_token["codistill"] == 16 * 512 * 4 / (16 * 2048) == 1.0
    q = make_plan(10**9, 128_256, 2048, 16, 8, 4, 2, 16, dtype="fp8", train_batch=64)
    assert q.wire["index_dtype"] == "int32"  # vocabulary past 65,536
    assert q.wire_bytes_per_position == 8 * (1 + 4) + 1
    assert q.train_tokens_per_group_per_step == 64 * 2048
    assert q.per_token["codistill"] == 16 * 2048 * 41 / 4 / (64 * 2048)


@pytest.mark.parametrize("groups, world", [(2, 2), (2, 16), (4, 16), (8, 64), (3, 12)])
def test_routes_move_the_same_total(groups, world):
    p = make_plan(10**6, 1000, 16, 2 * world, 8, 3, groups, world)
    assert p.leader_bytes_per_exchange * groups == p.exchange_bytes_per_exchange
    assert p.boundary["codistill"] * groups * 3 == p.exchange_bytes_per_exchange
    assert p.rail_bytes_per_exchange * world == pytest.approx(p.exchange_bytes_per_exchange)
    ranks = [r for e in p.layout for r in e["ranks"]]
    assert ranks == list(range(world))


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e9", 10**9),
        ("1B", 10**9),
        ("1b", 10**9),
        ("1.5B", 1_500_000_000),
        ("350M", 350_000_000),
        ("125m", 125_000_000),
        ("1100000", 1_100_000),
        ("1_100_000", 1_100_000),
        ("10k", 10_000),
        ("32K", 32_000),
        ("7E9", 7 * 10**9),
        ("2.5e6", 2_500_000),
    ],
)
def test_parse_count(text, value):
    assert parse_count(text) == value
    assert parse(["--params", text]).params == value


@pytest.mark.parametrize("text", ["abc", "1x", "", "-5", "1e", "1.2.3"])
def test_parse_count_rejects(text, capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count(text)
    with pytest.raises(SystemExit) as info:
        parse(["--params", text])
    assert info.value.code == 2


def test_defaults():
    args = parse([])
    assert (args.vocab, args.seq_len, args.batch, args.topk) == (32000, 2048, 16, 32)
    assert (args.interval, args.groups, args.world, args.dtype, args.json) == (
        1,
        2,
        16,
        "bf16",
        False,
    )


def test_one_billion_params_default_flags_ratio(capsys):
    assert run_plan(parse(["--params", "1B", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    # 16 x 2048 x 32 x 4 B = 4.19 MB per group, every step (the config default interval 1)
    assert out["boundary"]["codistill"] == 16 * 2048 * 32 * 4
    assert out["ratio"] == out["ratios"]["ring"] == pytest.approx(3.75e9 / (16 * 2048 * 32 * 4))
    assert "divided by" in out["ratio_of"] and "one node" in out["ratio_of"]


def test_json_output(capsys):
    assert run_plan(parse(["--params", "350M", "--topk", "0", "--json"])) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object on one line
    data = json.loads(out)
    for key in ("boundary", "per_token", "ratios", "ratio", "ratio_of", "layout",
                "cheaper_than_diloco_above_params", "wire"):
        assert key in data
    assert data["params"] == 350_000_000 and data["wire"]["index_dtype"] is None


def test_text_output(capsys):
    assert run_plan(parse(["--params", "1B", "--groups", "4", "--world", "32"])) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[:6]
    assert any("bytes leaving one node per step" in line for line in first)  # like for like first
    assert "4 groups x 8 ranks per group" in out
    assert "group 3: ranks 24-31, leader 24" in out
    assert "leaders group: [0, 8, 16, 24]" in out
    assert "rail 1: [1, 9, 17, 25]" in out
    assert "Streaming DiLoCo" in out and "GB" in out and "MB" in out
    assert out == format_plan(make_plan(10**9, 32000, 2048, 16, 32, 1, 4, 32)) + "\n"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--world", "6", "--groups", "4"], ["6", "4", "divisible"]),
        (["--topk", "300", "--vocab", "256"], ["300", "256"]),
        (["--params", "0"], ["params", "0"]),
        (["--batch", "-1"], ["batch", "-1"]),
        (["--seq-len", "0"], ["seq_len"]),
        (["--interval", "0"], ["interval"]),
        (["--world", "0"], ["world"]),
        (["--groups", "1", "--world", "4"], ["2 groups"]),
        (["--topk", "-1"], ["topk", "-1"]),
        (["--token-fraction", "0"], ["token_fraction", "0"]),
        (["--index-dtype", "uint16", "--vocab", "128256"], ["65,536", "128,256"]),
        (["--diloco-h", "0"], ["diloco_h"]),
    ],
)
def test_invalid_input_returns_2(argv, words, capsys):
    assert run_plan(parse([*argv, "--json"])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err
    for word in words:
        assert word in err


def test_make_plan_raises_value_error():
    with pytest.raises(ValueError, match="not divisible"):
        make_plan(10**9, 32000, 2048, 16, 32, 10, groups=4, world=6)
    with pytest.raises(ValueError, match="dtype"):
        make_plan(10**9, 32000, 2048, 16, 32, 10, 2, 16, dtype="int8")
    with pytest.raises(ValueError, match="grad_dtype"):
        make_plan(10**9, 32000, 2048, 16, 32, 10, 2, 16, grad_dtype="fp8")


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1500) == "1.50 KB"
    assert human_bytes(6_291_456) == "6.29 MB"
    assert human_bytes(60e9) == "60.00 GB"
    assert human_bytes(2.5e12) == "2.50 TB"


def test_weights_mode_figures_by_hand():
    # K=2, W=8 (S=4), P=1000 bf16 weights, interval 10, batch 2 x seq 8 tokens per group.
    p = make_plan(1000, 50, 8, 2, 4, 10, 2, 8)
    assert p.weight_bytes_per_exchange == 2 * 1 * 1000 * 2
    assert p.weight_bytes_per_step == 400.0
    assert p.teacher_bytes_per_rank == 1 * 1000 * 2 / 4
    assert p.teacher_forward_flops_per_rank_per_step == 1 * 2 * 1000 * 16 / 4
    assert p.weight_ratio == p.boundary["ring"] / (1 * 1000 * 2 / 10)


def test_bytes_table_by_hand(tmp_path):
    """benchmarks/bytes_table.py (RESULTS.md's table): 2 groups of 8, 1M tokens per step at 1B."""
    from benchmarks import bytes_table

    rows = bytes_table.table()["rows"]
    tokens = 2**20 // 2  # per group per step
    assert rows["sync ring all-reduce (bf16 grads)"]["1B"] == pytest.approx(3.75e9 / tokens)
    assert rows["DiLoCo H=500, fp32 pseudo-gradient"]["7B"] == pytest.approx(4 * 7e9 / 500 / 2**21)
    assert rows["Streaming DiLoCo H=100, 4-bit"]["70B"] == pytest.approx(0.5 * 70e9 / 100 / 2**21)
    for shape in bytes_table.SHAPES:
        assert rows["codistill defaults (top-32, bf16 + uint16 ids)"][shape] == 32 * 4
        assert rows["codistill compact (top-1, fp8 + uint16 id + scale)"][shape] == 1 + 2 + 1
        assert rows["codistill top-4 fp8, token_fraction 1/4 (at the default's quality)"][shape] == (4 * (1 + 2) + 1) / 4
    assert bytes_table.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "bytes_per_token.png").read_bytes().startswith(b"\x89PNG")
    assert "| 70B |" in (tmp_path / "results.md").read_text()


def test_memory_estimate_by_hand(capsys):
    """P = 1,600, S = 2: states 16 P / S = 12,800 B; gathered 2 x 2 P / n = 1,600 B (n = 4);
    activations 34 h b L n + 10 b L V = 34*8*2*4*4 + 10*2*4*50 = 8,704 + 4,000 B; build peak
    4 P / S + 4 max(V h, P / n) = 3,200 + 4*400 B; tokens 2 x 4 x W=4 = 32 per step."""
    from codistill_ds.plan.memory import memory_plan

    m = memory_plan(params=1600, world=4, groups=2, micro_batch=2, seq_len=4, hidden=8, layers=4, vocab=50)
    assert (m.model_state_bytes, m.gathered_bytes, m.activation_bytes) == (12800, 1600, 12704)
    assert (m.build_peak_bytes, m.tokens_per_step) == (4800, 32)
    assert m.total_bytes == 12800 + 1600 + 12704
    argv = ["--params", "953223168", "--seq-len", "2048", "--batch", "8", "--interval", "16",
            "--world", "16", "--micro-batch", "4", "--hidden", "2048", "--layers", "16"]
    assert run_plan(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "model states per rank (16 P / S)             1.91 GB" in out
    assert "cross-group bytes per training token: 2.000" in out
    assert run_plan(parse([*argv, "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["tokens_per_step"] == 4 * 2048 * 16
    assert run_plan(parse(["--micro-batch", "4"])) == 2  # hidden and layers are needed then


def test_step_times_by_hand() -> None:
    """`plan --link-gbps 10 --device-tflops 1000 --mfu 0.5 --noise-scale 65536`, 1B parameters
    (no sizes: F = 2P), L 2048, B 16 per group, K 2, W 16 (S 8), top-32 bf16 uint16 (128 B per
    position), every figure by hand."""
    import json

    from codistill_ds.cli import main

    argv = ["plan", "--params", "1B", "--vocab", "32000", "--seq-len", "2048", "--batch", "16", "--groups", "2",
            "--world", "16", "--link-gbps", "10", "--device-tflops", "1000", "--mfu", "0.5",
            "--noise-scale", "65536", "--json"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    st = json.loads(buf.getvalue())["step_times"]
    rate, link = 1000e12 * 0.5, 10e9 / 8
    f, tokens, s = 2e9, 16 * 2048, 8
    assert st["forward_flops_per_token"] == f
    m = st["methods"]
    assert m["sync"]["compute_s"] == pytest.approx(3 * f * tokens / s / rate)  # 49.152 ms
    assert m["sync"]["compute_s"] == pytest.approx(0.049152)
    # the cheaper of ring (2 x 15/16 x 2 B x 1e9) and hierarchical (2 x 1/2 x 2 B x 1e9) all-reduce
    assert m["sync"]["bytes_per_step"] == 2e9 and m["sync"]["comm_s"] == pytest.approx(1.6)
    assert m["diloco"]["compute_s"] == m["sync"]["compute_s"]
    assert m["diloco"]["bytes_per_step"] == pytest.approx(4e9 / 500) and m["diloco"]["comm_s"] == pytest.approx(0.0064)
    # codistill: training plus the teacher forward on the peer's batch, 4 F per token
    assert m["codistill"]["compute_s"] == pytest.approx(4 * f * tokens / s / rate)  # 65.536 ms
    assert m["codistill"]["bytes_per_step"] == 16 * 2048 * 128
    assert m["codistill"]["comm_s"] == pytest.approx(16 * 2048 * 128 / link)  # 3.355 ms
    for k in m.values():
        assert k["step_s"] == pytest.approx(k["compute_s"] + k["comm_s"])
    assert st["group_batch_tokens"] == 32768 and st["past_critical"] is False
    assert st["sync_update_worth"] == pytest.approx((1 + 2) / (1 + 1))


def test_step_time_section_only_when_asked() -> None:
    import contextlib
    import io

    from codistill_ds.cli import main

    outs = []
    for extra in ([], ["--link-gbps", "10"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["plan", "--params", "1B", *extra]) == 0
        outs.append(buf.getvalue())
    assert "predicted step time" not in outs[0] and "predicted step time" in outs[1]
    assert outs[1].startswith(outs[0])


def test_flops_of_the_benchmark_quick_model() -> None:
    """The quick model (h 64, 4 layers, MLP 256, V 256, L 128): matrices 4 (4 x 64^2 + 3 x 64 x 256)
    + 64 x 256 = 278,528 weights, F = 2 x 278,528 + 2 x 4 x 128 x 64 = 622,592 FLOPs per token;
    codistill K=2 on the train batch costs 4/3 of sync per update, 1 + 1/3 x 1/4 ... by rows."""
    from codistill_ds.plan.compute import DecoderShape, update_flops

    shape = DecoderShape(295_488, 256, 128, 64, 4, 256, 4)
    assert shape.matmul_params() == 278_528
    f = shape.forward_flops_per_token()
    assert f == 622_592
    sync = update_flops(shape, "sync", 1, 128)
    assert sync == 3 * f * 128 * 128
    assert update_flops(shape, "train", 2, 64) / sync == pytest.approx(8 / 6)
    assert update_flops(shape, "train", 2, 64, interval=10) / sync == pytest.approx((6 + 0.2) / 6)
    assert update_flops(shape, "train", 2, 64, fraction=0.25) / sync == pytest.approx((6 + 0.5) / 6)
    assert update_flops(shape, "shared", 2, 64, exchange_batch=64) / sync == pytest.approx((6 + 8) / 6)
    assert update_flops(shape, "shared", 2, 64, exchange_batch=64, alpha=0) / sync == pytest.approx((6 + 2) / 6)
    assert update_flops(shape, "weights", 2, 64, interval=10) / sync == pytest.approx(8 / 6)

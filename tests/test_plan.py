"""`codistill-ds plan`: byte formulas against hand-computed numbers, flags, exit codes."""

from __future__ import annotations

import argparse
import json

import pytest

from codistill_ds.plan import (
    add_plan_arguments,
    format_plan,
    human_bytes,
    make_plan,
    parse_count,
    run_plan,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return parser.parse_args(argv)


def test_small_case_by_hand():
    # 2 groups x 2 ranks, 4 sequences x 8 tokens, top-10 in bf16 (2 B) + int32 indices (4 B).
    p = make_plan(
        params=1000, vocab=100, seq_len=8, batch=4, topk=10, interval=5, groups=2, world=4
    )
    assert (p.value_bytes, p.index_bytes, p.grad_bytes, p.entries_per_token) == (2, 4, 2, 10)
    assert p.ranks_per_group == 2
    assert p.payload_bytes_per_group == 4 * 8 * 10 * 6 == 1920
    assert p.exchange_bytes_per_exchange == 2 * 1 * 1920 == 3840
    assert p.exchange_bytes_per_step == 3840 / 5 == 768
    assert p.allreduce_bytes_per_step == 2 * 3 * 1000 * 2 == 12000
    assert p.allreduce_bytes_per_rank_per_step == 12000 / 4
    assert p.ratio == pytest.approx(12000 / 768)
    assert p.leader_bytes_per_exchange == 1920  # the whole group's payload to 1 peer
    assert p.rail_bytes_per_exchange == 960  # half of it per rank
    assert p.layout == [
        {"group": 0, "ranks": [0, 1], "leader": 0},
        {"group": 1, "ranks": [2, 3], "leader": 2},
    ]


def test_full_vocab_three_groups_fp32_by_hand():
    p = make_plan(
        params=500,
        vocab=50,
        seq_len=4,
        batch=2,
        topk=0,
        interval=1,
        groups=3,
        world=6,
        dtype="fp32",
        grad_dtype="fp32",
    )
    assert (p.value_bytes, p.index_bytes, p.entries_per_token) == (4, 0, 50)  # no indices
    assert p.payload_bytes_per_group == 2 * 4 * 50 * 4 == 1600
    assert p.exchange_bytes_per_exchange == 3 * 2 * 1600 == 9600
    assert p.exchange_bytes_per_step == 9600
    assert p.allreduce_bytes_per_step == 2 * 5 * 500 * 4 == 20000
    assert p.leader_bytes_per_exchange == 2 * 1600
    assert p.rail_bytes_per_exchange == 2 * 1600 / 2
    assert [e["leader"] for e in p.layout] == [0, 2, 4]
    assert p.layout[2]["ranks"] == [4, 5]


@pytest.mark.parametrize("groups, world", [(2, 2), (2, 16), (4, 16), (8, 64), (3, 12)])
def test_routes_move_the_same_total(groups, world):
    p = make_plan(10**6, 1000, 16, 2 * world, 8, 3, groups, world)
    assert p.leader_bytes_per_exchange * groups == p.exchange_bytes_per_exchange
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
    assert out["ratio"] >= 1000
    # 16 x 2048 x 32 x 6 B = 6.29 MB per group, x2 groups, every step (the config default interval 1); 2 x 15 x 1e9 x 2 B.
    assert out["exchange_bytes_per_step"] == 2 * 16 * 2048 * 32 * 6
    assert out["allreduce_bytes_per_step"] == 2 * 15 * 10**9 * 2


def test_json_output(capsys):
    assert run_plan(parse(["--params", "350M", "--topk", "0", "--json"])) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object on one line
    data = json.loads(out)
    for key in ("exchange_bytes_per_step", "allreduce_bytes_per_step", "ratio", "layout"):
        assert key in data
    assert data["params"] == 350_000_000 and data["index_bytes"] == 0


def test_text_output(capsys):
    assert run_plan(parse(["--params", "1B", "--groups", "4", "--world", "32"])) == 0
    out = capsys.readouterr().out
    assert "4 groups x 8 ranks per group" in out
    assert "group 3: ranks 24-31, leader 24" in out
    assert "leaders group: [0, 8, 16, 24]" in out
    assert "rail 1: [1, 9, 17, 25]" in out
    assert "ratio" in out and "GB" in out and "MB" in out
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
    assert p.weight_ratio == p.allreduce_bytes_per_step / 400.0


def test_memory_estimate_by_hand(capsys):
    """P = 1,600, S = 2: states 16 P / S = 12,800 B; gathered 2 x 2 P / n = 1,600 B (n = 4);
    activations 34 h b L n + 10 b L V = 34*8*2*4*4 + 10*2*4*50 = 8,704 + 4,000 B; build peak
    4 P / S + 4 max(V h, P / n) = 3,200 + 4*400 B; tokens 2 x 4 x W=4 = 32 per step."""
    from codistill_ds.memory import memory_plan

    m = memory_plan(params=1600, world=4, groups=2, micro_batch=2, seq_len=4, hidden=8, layers=4, vocab=50)
    assert (m.model_state_bytes, m.gathered_bytes, m.activation_bytes) == (12800, 1600, 12704)
    assert (m.build_peak_bytes, m.tokens_per_step) == (4800, 32)
    assert m.total_bytes == 12800 + 1600 + 12704
    argv = ["--params", "953223168", "--seq-len", "2048", "--batch", "8", "--interval", "16",
            "--world", "16", "--micro-batch", "4", "--hidden", "2048", "--layers", "16"]
    assert run_plan(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "model states per rank (16 P / S)             1.91 GB" in out
    assert "cross-group bytes per training token: 3.000" in out
    assert run_plan(parse([*argv, "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["tokens_per_step"] == 4 * 2048 * 16
    assert run_plan(parse(["--micro-batch", "4"])) == 2  # hidden and layers are needed then

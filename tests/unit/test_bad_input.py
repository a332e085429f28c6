"""Bad input fails before training, with a ConfigError/DataError that names the cause.

Property-based (hypothesis): any config and world size either validates or raises a
ConfigError naming a real field; every valid topology partitions the world; any bytes as a data
file either give a corpus or a DataError; the start-of-run handshake flags exactly the
disagreeing ranks. Examples: empty, tiny, binary, non-UTF-8 and malformed JSONL files, a
sequence longer than the data. The launched cases are dist/test_bad_input_runs.py.
"""

from __future__ import annotations

import dataclasses
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codistill_ds.config import (
    Config,
    ConfigError,
    DataConfig,
    config_to_dict,
    load_config,
)
from codistill_ds.config.validation import ranks_per_group, validate
from codistill_ds.data.corpus import build_corpus
from codistill_ds.data.sources import DataError
from codistill_ds.distributed.axes import ParallelDims, TopologyError
from codistill_ds.run import handshake as health


def dotted_fields(obj=None, prefix: str = "") -> set[str]:
    obj = obj or Config()
    out = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= {prefix + f.name} | dotted_fields(value, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


FIELDS = dotted_fields() | {"world_size", "config", "--set"}

NUMERIC = {
    "model.hidden_size": st.integers(-4, 96), "model.num_heads": st.integers(-1, 8),
    "model.num_kv_heads": st.one_of(st.none(), st.integers(-1, 8)),
    "model.max_seq_len": st.integers(-1, 256), "data.seq_len": st.integers(-1, 300),
    "data.micro_batch_size": st.integers(-1, 8),
    "data.exchange_batch_size": st.one_of(st.none(), st.integers(-1, 16)),
    "data.val_fraction": st.floats(-0.5, 1.5), "codistill.groups": st.integers(-1, 6),
    "codistill.interval": st.integers(-1, 5), "codistill.staleness": st.integers(-1, 4),
    "codistill.topk": st.integers(-1, 400), "codistill.temperature": st.floats(-1, 4),
    "codistill.alpha": st.floats(-1, 2), "optim.lr": st.floats(-1e-3, 1e-2),
    "optim.min_lr": st.floats(-1e-3, 1e-2), "optim.dropout": st.floats(-0.5, 1.5),
    "train.steps": st.integers(-1, 50), "train.save_interval": st.integers(-1, 10),
    "train.keep_checkpoints": st.integers(-1, 4), "backend.peer_timeout_s": st.floats(-5, 100),
}
CHOICE = {"codistill.loss": st.sampled_from(["kl", "jsd", "mse", "hellinger"]),
          "codistill.route": st.sampled_from(["leaders", "rails", "ring"]),
          "codistill.exchange_batch": st.sampled_from(["shared", "train"]),
          "backend.name": st.sampled_from(["fsdp", "deepspeed", "megatron"]),
          "train.resume": st.sampled_from(["auto", "none", "/no/such/checkpoint"])}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.fixed_dictionaries({k: v for k, v in {**NUMERIC, **CHOICE}.items()}),
       world=st.integers(0, 16), vocab=st.sampled_from([None, 64, 256]))
def test_any_config_validates_or_names_a_field(values, world, vocab):
    cfg = load_config(None)
    for key, value in values.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    try:
        validate(cfg, world, vocab)
    except ConfigError as err:
        assert err.field in FIELDS, err.field
        assert f"'{err.field}'" in str(err)
        return
    # whatever passes is runnable: the layout exists and the shapes agree
    groups = cfg.codistill.groups if cfg.codistill.enabled else 1
    S = ranks_per_group(cfg, world)
    assert ParallelDims(world_size=world, groups=groups, rank=world - 1).group_size == S
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert vocab is None or cfg.codistill.topk <= vocab
    assert cfg.data.exchange_batch_size is None or cfg.data.exchange_batch_size % S == 0
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    assert cfg.backend.peer_timeout_s > 0 and cfg.train.keep_checkpoints >= 0


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(sorted(NUMERIC)), raw=st.text(string.printable, max_size=12))
def test_any_override_text_loads_or_names_the_field(key, raw):
    try:
        cfg = load_config(None, [f"{key}={raw}"])
    except ConfigError as err:
        assert err.field in FIELDS and (err.field == key or err.field == "--set"), (key, err)
        return
    try:
        validate(cfg, 4, 256)
    except ConfigError as err:
        assert err.field in FIELDS


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 64), groups=st.integers(1, 16))
def test_every_valid_topology_partitions_the_world(world, groups):
    try:
        layouts = [ParallelDims(world_size=world, groups=groups, rank=r) for r in range(world)]
    except TopologyError as err:
        assert world % groups and f"codistill.groups={groups}" in str(err)
        return
    S = world // groups
    by_group = [layout.group_ranks(g) for g, layout in zip(range(groups), layouts)]
    assert sorted(r for ranks in by_group for r in ranks) == list(range(world))
    rails = [layouts[0].rail_ranks(r) for r in range(S)]
    assert sorted(r for ranks in rails for r in ranks) == list(range(world))
    for layout in layouts:
        assert layout.rank in layout.group_ranks(layout.group_id)
        assert layout.rank in layout.rail_ranks(layout.position)
        assert layout.leader_of(layout.group_id) == layout.group_ranks(layout.group_id)[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), seq_len=st.integers(1, 64), fmt=st.sampled_from(["text", "jsonl"]))
def test_any_bytes_give_a_corpus_or_a_data_error(tmp_path_factory, data, seq_len, fmt):
    path = tmp_path_factory.mktemp("bytes") / f"corpus.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    path.write_bytes(data)
    cfg = DataConfig(train_files=[str(path)], seq_len=seq_len, micro_batch_size=1, format=fmt)
    try:
        corpus = build_corpus(cfg)
    except DataError as err:
        assert str(err).split(":")[0] in {"data.train_files", "data.seq_len", "data.text_field"}, err
        return
    assert corpus.train.shape[1] == seq_len + 1 and len(corpus.train) >= 1
    assert int(corpus.train.max()) < corpus.vocab_size


CASES = {
    "empty": (b"", "txt", {}, "is empty"),
    "tiny": (b"hello", "txt", {}, "data.seq_len: the training split has"),
    "binary": (bytes(range(256)) * 8, "txt", {}, "looks binary (NUL byte at offset 0)"),
    "latin-1": ("caf\xe9 cr\xe8me ".encode("latin-1") * 50, "txt", {}, "is not UTF-8 (byte 0xe9 at offset 3)"),
    "cut utf-8": (("ok " * 50).encode() + "é".encode()[:1], "txt", {}, "ends inside a multi-byte"),
    "whitespace": (b"\n \n\t\n", "txt", {}, "hold no text"),
    "seq longer than data": (b"abcdefgh " * 40, "txt", {"seq_len": 500}, "fewer than one sequence of seq_len+1=501"),
    "no validation window": (b"abcdefgh " * 40, "txt", {"seq_len": 64, "micro_batch_size": 4},
                             "data.seq_len: the validation split"),
    "bad json": (b'{"text": "a"}\n{"text": \n', "jsonl", {}, "cannot read"),
    "missing field": (b'{"body": "a"}\n', "jsonl", {}, "data.text_field: 'text' not in the jsonl columns ['body']"),
    "non-text field": (b'{"text": [1, 2]}\n', "jsonl", {}, "data.text_field: 'text' of row 0 is [1, 2], not text"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_data_file_names_the_cause(tmp_path, case):
    data, ext, extra, words = CASES[case]
    path = tmp_path / f"corpus.{ext}"
    path.write_bytes(data)
    cfg = DataConfig(train_files=[str(path)], **{"seq_len": 16, "micro_batch_size": 1, **extra})
    with pytest.raises(DataError) as info:
        build_corpus(cfg)
    assert words in str(info.value)
    if "train_files" in str(info.value) and case != "bad json":
        assert str(path) in str(info.value) or case == "whitespace"


# ---- the start-of-run handshake -------------------------------------------------------------------

def _fingerprints(vocabs: list[int], lrs: list[float]) -> list[dict]:
    out = []
    for v, lr in zip(vocabs, lrs):
        cfg = load_config(None, [f"optim.lr={lr}"])
        out.append(health.fingerprint(cfg, v, 1000, torch.arange(10)))
    return out


@settings(max_examples=100, deadline=None)
@given(K=st.integers(2, 3), S=st.integers(1, 3),
       vocabs=st.lists(st.sampled_from([256, 300]), min_size=9, max_size=9),
       lrs=st.lists(st.sampled_from([0.01, 0.02]), min_size=9, max_size=9))
def test_handshake_flags_exactly_the_disagreeing_ranks(K, S, vocabs, lrs):
    world = K * S
    vocabs, lrs = vocabs[:world], lrs[:world]
    prints = _fingerprints(vocabs, lrs)
    layout = ParallelDims(world_size=world, groups=K, rank=0)

    def fake_all_gather(obj, group=None):
        return list(prints)

    original = health.comm.all_gather_object
    health.comm.all_gather_object = fake_all_gather
    try:
        if len(set(vocabs)) > 1:
            with pytest.raises(ConfigError) as info:
                health.check_peers_compatible(layout, prints[0])
            assert info.value.field == "data.tokenizer"
            for v in set(vocabs):
                ranks = [r for r in range(world) if vocabs[r] == v]
                assert f"{v} on ranks {ranks}" in str(info.value)
        elif len(set(lrs)) > 1:
            with pytest.raises(ConfigError) as info:
                health.check_peers_compatible(layout, prints[0])
            assert info.value.field == "optim.lr"
        else:
            health.check_peers_compatible(layout, prints[0])
    finally:
        health.comm.all_gather_object = original


def test_fingerprint_ignores_per_node_paths():
    a = load_config(None, ["run_dir=/node0/run", "data.train_files=[/a/x.txt]"])
    b = load_config(None, ["run_dir=/node1/run", "data.train_files=[/b/x.txt]"])
    corpus = torch.arange(100)
    assert health.fingerprint(a, 256, 10, corpus) == health.fingerprint(b, 256, 10, corpus)
    assert "optim.lr" in health.fingerprint(a, 256, 10, corpus)["config"]
    assert config_to_dict(a)["run_dir"] == "/node0/run"


# ---- two real launches ----------------------------------------------------------------------------






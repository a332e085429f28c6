"""The typed config: loading, merge precedence, type errors, validation rules, round trip."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from codistill_ds.config import (
    PACKAGE_ROOT,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    resolve_path,
    save_config,
)
from codistill_ds.config.validation import ranks_per_group, validate


@pytest.fixture
def ds_json(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text('{"zero_optimization": {"stage": 3}}')
    return str(path)


@pytest.fixture
def base(ds_json):
    """Overrides that make the defaults valid without relying on the repo's ds_configs/."""
    return [f"backend.ds_config={ds_json}"]


def write_yaml(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ----------------------------------------------------------------------------- loading


def test_defaults_load():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.codistill.groups == 2 and cfg.codistill.topk == 32 and cfg.codistill.loss == "kl"
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.train_files == [] and cfg.data.exchange_batch_size is None
    assert cfg.backend.ds_config == "ds_configs/zero3.json"


def test_set_beats_file_beats_default(tmp_path):
    path = write_yaml(tmp_path, {"codistill": {"topk": 8, "interval": 5}, "seed": 7})
    cfg = load_config(path, ["codistill.topk=16"])
    assert cfg.codistill.topk == 16  # --set beats the file
    assert cfg.codistill.interval == 5  # the file beats the default
    assert cfg.seed == 7
    assert cfg.codistill.groups == 2  # untouched default
    assert load_config(path).codistill.topk == 8


def test_later_override_wins():
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


def test_empty_yaml_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path)) == Config()


def test_override_values_are_yaml_then_typed():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-3",  # PyYAML reads this as a string; the float field takes it
            "optim.min_lr=0",  # an int for a float field is fine
            "codistill.enabled=false",
            "codistill.same_init=true",
            "data.max_bytes=null",
            "train.steps=1e3",
            "optim.betas=[0.8, 0.99]",
            "optim.weight_decay_milestones=[[100, 0.01], [200, 0]]",
            "data.train_files=a.txt",
            "run_dir=2024",
            "model={hidden_size: 32, num_heads: 2}",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    assert cfg.codistill.enabled is False and cfg.codistill.same_init is True
    assert cfg.data.max_bytes is None
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.weight_decay_milestones == [(100, 0.01), (200, 0.0)]
    assert cfg.data.train_files == ["a.txt"]
    assert cfg.run_dir == "2024"
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (32, 2, 2)


def test_yaml_milestones_become_pairs(tmp_path):
    path = write_yaml(tmp_path, {"optim": {"dropout_milestones": [[0, 0.1], [500, 0.0]]}})
    assert load_config(path).optim.dropout_milestones == [(0, 0.1), (500, 0.0)]


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("train.steps=abc", "train.steps", ["integer", "abc"]),
        ("train.steps=1.5", "train.steps", ["integer", "1.5"]),
        ("optim.lr=fast", "optim.lr", ["number", "fast"]),
        ("codistill.enabled=1", "codistill.enabled", ["true or false", "1"]),
        ("optim.betas=[0.9]", "optim.betas", ["2 items"]),
        ("optim.weight_decay_milestones=[[1]]", "optim.weight_decay_milestones[0]", ["2"]),
        ("optim.weight_decay_milestones=[[x, 0.1]]", "optim.weight_decay_milestones[0][0]", ["x"]),
        ("model.hidden_size=[1, 2]", "model.hidden_size", ["integer"]),
        ("model=3", "model", ["mapping"]),
    ],
)
def test_type_errors_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.field == field
    for word in words:
        assert word in str(info.value)


def test_yaml_type_error_names_the_field(tmp_path):
    path = write_yaml(tmp_path, {"data": {"seq_len": "long"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "data.seq_len"


@pytest.mark.parametrize(
    "data, field, valid",
    [
        ({"sed": 1}, "sed", "codistill"),
        ({"codistill": {"topK": 4}}, "codistill.topK", "topk"),
        ({"optim": {"betas": [0.9, 0.9], "beta1": 0.9}}, "optim.beta1", "betas"),
    ],
)
def test_unknown_yaml_keys_rejected(tmp_path, data, field, valid):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    assert info.value.field == field
    assert f"'{field}'" in str(info.value) and valid in str(info.value)


@pytest.mark.parametrize(
    "override, field, valid",
    [
        ("codistill.topK=4", "codistill.topK", "topk"),
        ("modle.hidden_size=4", "modle", "model"),
        ("seed.x=4", "seed", "model"),
        ("nonsense=1", "nonsense", "run_dir"),
    ],
)
def test_unknown_override_keys_rejected(override, field, valid):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.field == field
    assert valid in str(info.value)


def test_override_without_equals():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["codistill.topk"])
    assert "key=value" in str(info.value)


def test_missing_yaml_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "config" and path in str(info.value)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.field == "config"


def test_error_format_and_pickle():
    err = ConfigError("codistill.loss", "got 'ce'")
    assert str(err) == "config field 'codistill.loss': got 'ce'"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert again.field == err.field and str(again) == str(err)


# ----------------------------------------------------------------------------- validation


def test_valid_config_passes(base):
    validate(load_config(None, base), world_size=4, vocab_size=256)
    validate(load_config(None, base), world_size=2)


def test_fsdp_needs_no_ds_config():
    validate(load_config(None, ["backend.name=fsdp", "backend.ds_config=/no/such.json"]), 4)


@pytest.mark.parametrize(
    "override",
    [
        "codistill.staleness=1000",  # may exceed interval
        "codistill.loss=mse",  # fine with top-k
        "codistill.topk=0",
        "codistill.topk=256",
        "data.exchange_batch_size=8",
        "optim.weight_decay_milestones=[[0, 0.1], [100, 0.0]]",
        "optim.dropout_milestones=[[0, 0.2], [100, 0.0]]",
        "model.num_kv_heads=2",
        "codistill.route=rails",
        "data.max_bytes=null",
        "codistill.dtype=fp8",
        "codistill.topk=1",
        "codistill.index_dtype=uint16",
    ],
)
def test_valid_variants_pass(base, override):
    validate(load_config(None, [*base, override]), world_size=4, vocab_size=256)


RULES = [
    # (overrides, world, vocab, field, words in message)
    (["codistill.groups=0"], 4, None, "codistill.groups", [">= 1", "0"]),
    (["codistill.groups=1"], 4, None, "codistill.groups",
     ["at least 2 groups", "codistill.enabled=false"]),
    (["codistill.groups=4"], 6, None, "codistill.groups",
     ["world size 6 is not divisible by codistill.groups=4"]),
    (["model.arch=bert"], 4, None, "model.arch", ["bert", "llama", "gpt2"]),
    (["data.builtin=wiki"], 4, None, "data.builtin", ["wiki", "stdlib"]),
    (["data.format=xml"], 4, None, "data.format", ["xml", "auto", "text", "jsonl"]),
    (["codistill.mode=grads"], 4, None, "codistill.mode", ["grads", "logits", "weights"]),
    (["codistill.mode=weights", "codistill.exchange_batch=train"], 4, None, "codistill.exchange_batch", ["own batch"]),
    (["codistill.route=ring"], 4, None, "codistill.route", ["ring", "leaders", "rails"]),
    (["codistill.dtype=int8"], 4, None, "codistill.dtype", ["int8", "bf16", "fp16", "fp32", "fp8"]),
    (["codistill.index_dtype=int16"], 4, None, "codistill.index_dtype",
     ["int16", "auto", "uint16", "int32"]),
    (["codistill.index_dtype=uint16"], 4, 128_256, "codistill.index_dtype",
     ["65,536", "128,256", "auto"]),
    (["codistill.token_fraction=0"], 4, None, "codistill.token_fraction", ["(0, 1]", "0.0"]),
    (["codistill.token_fraction=1.5"], 4, None, "codistill.token_fraction", ["1.5"]),
    (["codistill.token_fraction=0.25", "codistill.mode=weights", "backend.name=fsdp"], 4, None,
     "codistill.token_fraction", ["'logits'", "'weights'"]),
    (["codistill.loss=ce"], 4, None, "codistill.loss", ["ce", "reverse_kl", "jsd", "mse"]),
    (["optim.schedule=step"], 4, None, "optim.schedule", ["step", "cosine", "linear"]),
    (["backend.name=ddp"], 4, None, "backend.name", ["ddp", "deepspeed", "fsdp"]),
    (["backend.precision=fp8"], 4, None, "backend.precision", ["fp8", "auto", "bf16"]),
    (["data.seq_len=0"], 4, None, "data.seq_len", ["> 0", "0"]),
    (["data.micro_batch_size=-2"], 4, None, "data.micro_batch_size", ["-2"]),
    (["data.exchange_batch_size=0"], 4, None, "data.exchange_batch_size", ["0"]),
    (["data.val_batches=0"], 4, None, "data.val_batches", ["0"]),
    (["data.max_bytes=0"], 4, None, "data.max_bytes", ["0"]),
    (["codistill.interval=0"], 4, None, "codistill.interval", ["0"]),
    (["train.steps=0"], 4, None, "train.steps", ["0"]),
    (["train.grad_accum=0"], 4, None, "train.grad_accum", ["0"]),
    (["model.hidden_size=0"], 4, None, "model.hidden_size", ["0"]),
    (["model.num_layers=0"], 4, None, "model.num_layers", ["0"]),
    (["model.num_heads=0"], 4, None, "model.num_heads", ["0"]),
    (["model.num_kv_heads=0"], 4, None, "model.num_kv_heads", ["0"]),
    (["model.intermediate_size=0"], 4, None, "model.intermediate_size", ["0"]),
    (["model.max_seq_len=0"], 4, None, "model.max_seq_len", ["0"]),
    (["optim.lr=0"], 4, None, "optim.lr", ["> 0", "0.0"]),
    (["optim.eps=0"], 4, None, "optim.eps", ["0.0"]),
    (["backend.timeout_s=-1"], 4, None, "backend.timeout_s", ["-1.0"]),
    (["codistill.temperature=0"], 4, None, "codistill.temperature", ["> 0", "0.0"]),
    (["codistill.staleness=-1"], 4, None, "codistill.staleness", [">= 0", "-1"]),
    (["codistill.burn_in=-1"], 4, None, "codistill.burn_in", ["-1"]),
    (["codistill.ramp=-3"], 4, None, "codistill.ramp", ["-3"]),
    (["codistill.topk=-1"], 4, None, "codistill.topk", ["-1"]),
    (["codistill.alpha=-0.5"], 4, None, "codistill.alpha", [">= 0", "-0.5"]),
    (["optim.warmup_steps=-1"], 4, None, "optim.warmup_steps", ["-1"]),
    (["optim.grad_clip=-1"], 4, None, "optim.grad_clip", ["-1.0"]),
    (["optim.weight_decay=-0.1"], 4, None, "optim.weight_decay", ["-0.1"]),
    (["optim.min_lr=-1"], 4, None, "optim.min_lr", ["-1.0"]),
    (["train.eval_interval=-1"], 4, None, "train.eval_interval", ["-1"]),
    (["train.log_interval=-1"], 4, None, "train.log_interval", ["-1"]),
    (["train.save_interval=-1"], 4, None, "train.save_interval", ["-1"]),
    (["codistill.mode=weights", "backend.name=fsdp", "train.save_interval=5"], 4, None,
     "train.save_interval", ["weights", "set it to 0"]),
    (["data.val_fraction=1"], 4, None, "data.val_fraction", ["[0, 1)", "1.0"]),
    (["data.val_fraction=-0.1"], 4, None, "data.val_fraction", ["-0.1"]),
    (["optim.dropout=1.0"], 4, None, "optim.dropout", ["[0, 1)", "1.0"]),
    (["optim.betas=[1.0, 0.9]"], 4, None, "optim.betas", ["1.0"]),
    (["optim.lr=1e-4", "optim.min_lr=1e-3"], 4, None, "optim.min_lr", ["0.001", "0.0001"]),
    (["train.steps=2", "optim.warmup_steps=3"], 4, None, "optim.warmup_steps", ["3", "train.steps 2", "cosine"]),
    (["optim.dropout_milestones=[[0, 0.1], [50, 1.5]]"], 4, None, "optim.dropout_milestones",
     ["50", "1.5"]),
    (["optim.weight_decay_milestones=[[100, 0.1], [50, 0.0]]"], 4, None,
     "optim.weight_decay_milestones", ["100", "50", "increasing"]),
    (["optim.weight_decay_milestones=[[0, -0.1]]"], 4, None, "optim.weight_decay_milestones",
     ["-0.1"]),
    (["optim.dropout_milestones=[[10, 0.1], [10, 0.0]]"], 4, None, "optim.dropout_milestones",
     ["10"]),
    (["model.hidden_size=66"], 4, None, "model.hidden_size", ["66", "4"]),
    (["model.num_kv_heads=3"], 4, None, "model.num_kv_heads", ["4", "3"]),
    (["data.seq_len=512"], 4, None, "data.seq_len", ["512", "256"]),
    (["codistill.topk=300"], 4, 256, "codistill.topk",
     ["topk 300 exceeds the vocabulary size 256"]),
    (["codistill.loss=mse", "codistill.topk=300"], 4, 256, "codistill.topk", ["300", "256"]),
    (["data.exchange_batch_size=6"], 8, None, "data.exchange_batch_size", ["6", "4"]),
    (["data.tokenizer=/no/such/tokenizer"], 4, None, "data.tokenizer", ["/no/such/tokenizer"]),
    (["model.name_or_path=/no/such/model"], 4, None, "model.name_or_path", ["/no/such/model"]),
]  # fmt: skip


@pytest.mark.parametrize("overrides, world, vocab, field, words", RULES)
def test_validation_rules(base, overrides, world, vocab, field, words):
    cfg = load_config(None, [*base, *overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world, vocab_size=vocab)
    assert info.value.field == field, str(info.value)
    message = str(info.value)
    assert message.startswith(f"config field '{field}': ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_missing_train_file(base, tmp_path):
    there = tmp_path / "a.txt"
    there.write_text("hello")
    missing = str(tmp_path / "b.txt")
    validate(load_config(None, [*base, f"data.train_files=[{there}]"]), 2)
    cfg = load_config(None, [*base, f"data.train_files=[{there}, {missing}]"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, 2)
    assert info.value.field == "data.train_files" and missing in str(info.value)
    cfg = load_config(None, [*base, f"data.train_files=[{tmp_path}]"])  # a directory
    with pytest.raises(ConfigError, match="data.train_files"):
        validate(cfg, 2)


def test_missing_ds_config(tmp_path):
    missing = str(tmp_path / "zero9.json")
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, [f"backend.ds_config={missing}"]), 2)
    assert info.value.field == "backend.ds_config" and missing in str(info.value)


def test_local_tokenizer_dir_accepted(base, tmp_path):
    validate(load_config(None, [*base, f"data.tokenizer={tmp_path}"]), 2)


def test_disabled_trains_one_group(base):
    cfg = load_config(None, [*base, "codistill.enabled=false", "codistill.groups=1"])
    validate(cfg, world_size=3)
    assert ranks_per_group(cfg, 3) == 3
    enabled = load_config(None, base)
    assert ranks_per_group(enabled, 8) == 4


@settings(max_examples=300, deadline=None)
@given(
    world=st.integers(min_value=1, max_value=64),
    groups=st.integers(min_value=-2, max_value=16),
    enabled=st.booleans(),
)
def test_topology_property(world, groups, enabled):
    cfg = load_config(None, ["backend.name=fsdp", f"codistill.groups={groups}"])
    cfg.codistill.enabled = enabled
    should_fail = groups < 1 or (enabled and (groups < 2 or world % groups != 0))
    if should_fail:
        with pytest.raises(ConfigError) as info:
            validate(cfg, world_size=world)
        assert info.value.field == "codistill.groups"
    else:
        validate(cfg, world_size=world)


# ----------------------------------------------------------------------------- paths, round trip


def test_resolve_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.json").write_text("{}")
    assert resolve_path("here.json") == str(tmp_path / "here.json")
    # Not in the cwd: falls back to the package root (the parent of codistill_ds/).
    assert resolve_path("codistill_ds/cli.py") == str(PACKAGE_ROOT / "codistill_ds/cli.py")
    assert os.path.isabs(resolve_path("codistill_ds/config/schema.py"))
    assert resolve_path("no/such/file.json") == "no/such/file.json"
    assert resolve_path(str(tmp_path / "here.json")) == str(tmp_path / "here.json")


def test_ds_config_found_under_package_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(__file__, PACKAGE_ROOT)  # tests/unit/test_config.py exists under the root
    validate(load_config(None, [f"backend.ds_config={rel}"]), 2)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "seed=99",
            "run_dir=runs/x",
            "model.num_kv_heads=2",
            "data.train_files=[a.txt, b.jsonl]",
            "data.max_bytes=null",
            "data.exchange_batch_size=8",
            "codistill.loss=jsd",
            "codistill.temperature=2",
            "optim.betas=[0.8, 0.9]",
            "optim.weight_decay_milestones=[[0, 0.1], [100, 0.0]]",
            "optim.dropout_milestones=[[50, 0.1]]",
        ],
    )
    path = str(tmp_path / "run" / "config.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert load_config(str(tmp_path / "run" / "config.yaml")).optim.betas == (0.8, 0.9)


def test_config_to_dict_is_plain():
    d = config_to_dict(load_config(None, ["optim.weight_decay_milestones=[[0, 0.1]]"]))
    assert d["optim"]["betas"] == [0.9, 0.95]
    assert d["optim"]["weight_decay_milestones"] == [[0, 0.1]]
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"seed", "run_dir", "model", "data", "codistill", "optim", "train", "backend", "parallel"}


def test_exchange_backend_choices(base):
    """nccl needs CUDA (refused before any group exists); gloo and auto run anywhere."""
    for choice in ("auto", "gloo"):
        validate(load_config(None, [f"codistill.exchange_backend={choice}"]), 4, cuda_available=False)
    validate(load_config(None, ["codistill.exchange_backend=nccl"]), 4, cuda_available=True)
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, ["codistill.exchange_backend=nccl"]), 4, cuda_available=False)
    assert info.value.field == "codistill.exchange_backend" and "CUDA" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, ["codistill.exchange_backend=mpi"]), 4)
    assert "valid values: auto, nccl, gloo" in str(info.value)


def test_readme_configuration_reference_is_generated_from_the_docstrings():
    """The README's table is `python -m codistill_ds.config.doc`: every field, its default and its
    docstring; regenerate it (and paste) when config.py changes."""
    from pathlib import Path

    from codistill_ds.config.doc import reference_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference_table() in readme

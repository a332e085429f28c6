"""Pretrained folders on one process: the one-line errors for bad folders (raised by the CLI's
`prepare`, before any process group), `data.tokenizer: auto`, and reading parts of a tensor
against the whole tensor read by safetensors itself. The multi-rank loads are
tests/dist/test_pretrained.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codistill_ds.backends.pretrained import SafetensorsFolder, weights_folder
from codistill_ds.config import ConfigError, ModelConfig, load_config
from codistill_ds.data.tokenizers import resolve_tokenizer

REPO = Path(__file__).resolve().parents[2]


def save_llama(path: Path, vocab: int = 256, tied: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def byte_level_tokenizer(path: Path, n: int) -> None:
    """A WordLevel tokenizer of exactly `n` ids saved into `path` (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)


def prepare_error(monkeypatch, overrides: list[str]) -> ConfigError:
    """The error `prepare` (the CLI's first step on every rank) raises, on a 2-rank world."""
    from codistill_ds.run.job import prepare

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(str(REPO / "tests" / "tiny_test.yaml"), overrides)
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert "\n" not in str(err.value)
    return err.value


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama") / "m")


def test_folder_without_weights(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    assert weights_folder(ModelConfig(name_or_path=str(tmp_path))) is None  # auto: random from the config
    err = prepare_error(monkeypatch, [f"model.name_or_path={tmp_path}", "model.weights=pretrained"])
    assert err.field == "model.name_or_path" and "has no weights" in err.reason


def test_pytorch_bin_only_is_refused(tmp_path):
    save_llama(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="holds PyTorch .bin weights only"):
        weights_folder(ModelConfig(name_or_path=str(tmp_path)))


def test_random_ignores_the_weights_and_pretrained_needs_a_folder(llama):
    assert weights_folder(ModelConfig(name_or_path=str(llama))) == str(llama)
    assert weights_folder(ModelConfig(name_or_path=str(llama), weights="random")) is None
    with pytest.raises(ConfigError, match="model.weights"):
        weights_folder(ModelConfig(weights="pretrained"))


def test_missing_tensor(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    save_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    err = prepare_error(monkeypatch, [f"model.name_or_path={tmp_path}"])
    assert err.field == "model.name_or_path" and "lacks 1 tensor(s)" in err.reason and "lm_head.weight" in err.reason


def test_shape_the_config_does_not_build(tmp_path, monkeypatch):
    save_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = prepare_error(monkeypatch, [f"model.name_or_path={tmp_path}"])
    assert err.field == "model.name_or_path" and "does not fit its config" in err.reason
    assert "[32, 16] in the file, the config builds [48, 16]" in err.reason


def test_tokenizer_with_more_ids_than_the_embedding(tmp_path, monkeypatch):
    save_llama(tmp_path, vocab=64)  # data.tokenizer auto -> byte (256 ids) > 64 rows
    err = prepare_error(monkeypatch, [f"model.name_or_path={tmp_path}"])
    assert err.field == "data.tokenizer" and "256 ids" in err.reason and "vocabulary of 64" in err.reason


def test_tokenizer_auto(tmp_path, llama):
    assert resolve_tokenizer("auto", None) == "byte"
    assert resolve_tokenizer("auto", str(llama)) == "byte"  # no tokenizer files in the folder
    assert resolve_tokenizer("byte", str(tmp_path)) == "byte"
    byte_level_tokenizer(tmp_path, 40)
    assert resolve_tokenizer("auto", str(tmp_path)) == str(tmp_path)
    from codistill_ds.data.tokenizers import load_tokenizer

    assert load_tokenizer("auto", str(tmp_path)).vocab_size == 40
    assert load_tokenizer("auto").vocab_size == 256


def test_reads_of_parts_equal_the_whole_tensor(llama):
    from safetensors.torch import load_file

    whole = load_file(llama / "model.safetensors")
    files = SafetensorsFolder(str(llama))
    name = "model.layers.0.mlp.up_proj.weight"  # [32, 16]
    full = whole[name]
    assert torch.equal(files.read(name), full)
    assert torch.equal(files.read_box(name, (5, 3), (7, 9)), full[5:12, 3:12])
    for start, stop in ((0, 1), (15, 17), (37, 500), (0, full.numel())):
        assert torch.equal(files.read_flat(name, start, stop), full.reshape(-1)[start:stop])
    norm = "model.norm.weight"
    assert torch.equal(files.read_flat(norm, 3, 11), whole[norm][3:11])
    piece = files.read_box(name, (0, 0), (4, 16))
    piece.add_(1.0)  # its own memory, not the file's map
    assert torch.equal(files.read(name), full)

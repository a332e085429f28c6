"""Token shards: `codistill-ds tokenize` once, then memory-mapped windows that the streams index
exactly like the in-memory corpus.

A 2 MB and a 20 MB synthetic-plus-real corpus (tests/corpus.py, made in tmp) are tokenized by
the real command into 1M-token shards (windows straddle shard files). Checked: the index
(dtype, counts, per-shard sha256, digest) against the files; every training/validation window
and every batch the streams draw equal the in-memory path's on the same text; a process that
builds one rank's streams and draws 1,000 steps of batches has the same resident memory for
20 MB as for 2 MB (within 4 MB), while the in-memory path grows by > 100 MB.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.data.corpus import make_corpus
from codistill_ds.config import ConfigError, DataConfig, load_config
from codistill_ds.config.validation import validate
from codistill_ds.data.corpus import build_corpus, corpus_digest
from codistill_ds.data.shards import (
    ShardIndex,
    TokenShards,
    WindowView,
    stream_digest,
    token_dtype,
)
from codistill_ds.data.sources import DataError
from codistill_ds.data.streams import ExchangeStream, TrainStream, val_micro_batches
from codistill_ds.data.tokenize import ShardWriter, tokenize_files
from codistill_ds.data.tokenizers import ByteTokenizer
from launch import REPO, child_env

SIZES = {"2mb": 2_000_000, "20mb": 20_000_000}
SHARD_TOKENS = 1_000_000


def tokenize_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codistill_ds.cli", "tokenize", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (text file, shard directory written by the real command)."""
    tmp = tmp_path_factory.mktemp("corpora")
    out = {}
    for name, size in SIZES.items():
        text = make_corpus(tmp / f"{name}.txt", size)
        shards = tmp / f"{name}_shards"
        proc = tokenize_cli(str(text), "--out", str(shards), "--shard-tokens", str(SHARD_TOKENS))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{size:,} tokens (uint16, vocab 256) in {-(-size // SHARD_TOKENS)} shard(s)" in proc.stdout
        out[name] = (text, shards)
    return out


def test_index_describes_the_shards(corpora):
    text, shards = corpora["2mb"]
    index = json.loads((shards / "index.json").read_text())
    assert (index["tokenizer"], index["vocab_size"], index["dtype"]) == ("byte", 256, "uint16")
    assert index["tokens"] == text.stat().st_size == sum(s["tokens"] for s in index["shards"])
    assert [s["tokens"] for s in index["shards"]] == [SHARD_TOKENS, SHARD_TOKENS]
    for s in index["shards"]:
        data = (shards / s["file"]).read_bytes()
        assert len(data) == 2 * s["tokens"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert index["sources"] == [{"path": str(text), "bytes": SIZES["2mb"], "format": "text"}]
    assert index["digest"] == stream_digest("uint16", 256, [s["sha256"] for s in index["shards"]])
    ids = np.concatenate([np.fromfile(shards / s["file"], dtype="<u2") for s in index["shards"]])
    assert np.array_equal(ids, ByteTokenizer().encode(text.read_text()))
    again = tokenize_cli(str(text), "--out", str(shards))  # never overwrites a finished corpus
    assert again.returncode == 2 and "already holds token shards" in again.stderr


def test_shards_give_the_in_memory_batches(corpora):
    text, shards = corpora["2mb"]
    cfg = {"max_bytes": None, "seq_len": 128, "micro_batch_size": 4}
    mem = build_corpus(DataConfig(train_files=[str(text)], **cfg))
    mapped = build_corpus(DataConfig(train_files=[str(shards)], **cfg))
    assert isinstance(mapped.train, WindowView) and mapped.train.shape == tuple(mem.train.shape)
    assert torch.equal(mapped.train[np.arange(len(mem.train))], mem.train)
    assert torch.equal(mapped.val[np.arange(len(mem.val))], mem.val)
    steps = range(0, 1200, 7)  # group shards hold ~7.4k windows: 16 per step crosses epochs
    for g in range(2):
        for r in range(2):
            a, b = (TrainStream(c, 3, g, 2, r, 2, 4, 2) for c in (mem, mapped))
            assert all(torch.equal(a.micro_batch(t, m), b.micro_batch(t, m)) for t in steps for m in range(2))
        a, b = (ExchangeStream(c, 3, 8, g, 2) for c in (mem, mapped))
        assert all(torch.equal(a.batch_slice(e), b.batch_slice(e)) for e in steps)
        va, vb = (val_micro_batches(c, g, 2, 4, 8) for c in (mem, mapped))
        assert len(va) == len(vb) == 8 and all(torch.equal(x, y) for x, y in zip(va, vb))


@pytest.mark.timeout(240)
def test_resident_memory_does_not_grow_with_the_corpus(corpora, tmp_path):
    def probe(name: str, source: Path) -> dict:
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.data.probe", str(out), str(source), "1000"],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=200, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(out.read_text())
        res["grew_kb"] = {k: res["after"][k] - res["before"][k] for k in res["after"]}
        print(name, res["windows"], "windows, grew (kB):", res["grew_kb"], f"digest {res['digest_s'] * 1e3:.3f} ms")
        return res

    small, large = probe("shards_2mb", corpora["2mb"][1]), probe("shards_20mb", corpora["20mb"][1])
    in_memory = probe("memory_20mb", corpora["20mb"][0])
    assert large["checksum"] == in_memory["checksum"]  # the same batches as the in-memory path
    assert large["windows"] == in_memory["windows"] > 9 * small["windows"]
    # what grows with the corpus: the permutations, 4 bytes per window of the exchange stream
    # and of the group's shard (0.9 MB here; 8 bytes while one is drawn: the peak)
    for figure in ("VmRSS", "VmHWM"):
        extra_kb = large["grew_kb"][figure] - small["grew_kb"][figure]
        assert extra_kb < 4096, (figure, small["grew_kb"], large["grew_kb"])
    assert in_memory["grew_kb"]["RssAnon"] > 100_000  # the probe does see a corpus held in memory
    assert large["digest_s"] < 0.01  # the start-up fingerprint reads metadata, not 20M tokens


def test_uint32_when_the_vocabulary_does_not_fit_16_bits(tmp_path):
    assert token_dtype(65_536) == np.dtype("<u2") and token_dtype(65_537) == np.dtype("<u4")
    ids = np.random.default_rng(0).integers(0, 100_000, size=25_000)
    writer = ShardWriter(str(tmp_path), 100_000, shard_tokens=10_000)
    for chunk in np.array_split(ids, 7):
        writer.add(chunk)
    shards = writer.finish()
    assert [s["tokens"] for s in shards] == [10_000, 10_000, 5_000]
    assert (tmp_path / "tokens_00000.bin").stat().st_size == 40_000
    ShardIndex("mine", 100_000, "uint32", len(ids), shards, [], stream_digest("uint32", 100_000, [])).write(str(tmp_path))
    stream = TokenShards(str(tmp_path))
    assert np.array_equal(stream.read(0, len(ids)), ids) and np.array_equal(stream.read(9_990, 20_010), ids[9_990:20_010])
    view = WindowView(stream, 0, len(ids), 64)
    assert torch.equal(view[5::3][np.array([0, 2])][1], torch.from_numpy(ids[(5 + 6) * 64:(5 + 6) * 64 + 65]))
    with pytest.raises(ValueError, match="id 100000 outside its vocabulary of 100000"):
        writer.add(np.array([100_000]))


def test_jsonl_rows_tokenize_like_the_in_memory_path(tmp_path):
    paragraphs = make_corpus(tmp_path / "t.txt", 120_000).read_text().split("\n\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "body": p}) + "\n" for i, p in enumerate(paragraphs)))
    index = tokenize_files([str(rows)], str(tmp_path / "shards"), text_field="body", shard_tokens=30_000)
    cfg = {"max_bytes": None, "seq_len": 64, "text_field": "body", "micro_batch_size": 2}
    mem = build_corpus(DataConfig(train_files=[str(rows)], **cfg))
    mapped = build_corpus(DataConfig(train_files=[str(tmp_path / "shards")], **cfg))
    assert index.tokens == len("\n".join(paragraphs).encode()) and index.sources[0]["format"] == "jsonl"
    assert torch.equal(mapped.train[np.arange(len(mem.train))], mem.train)
    with pytest.raises(DataError, match="'nope' of row 0 is missing"):
        tokenize_files([str(rows)], str(tmp_path / "bad"), text_field="nope")


def test_digest_names_the_tokens_not_the_path(tmp_path):
    text = make_corpus(tmp_path / "a.txt", 50_000)
    other = tmp_path / "b.txt"
    other.write_text(text.read_text().replace("Citizen", "Citizan", 1))
    digests = []
    for name, source in (("one", text), ("two", text), ("three", other)):
        tokenize_files([str(source)], str(tmp_path / name))
        corpus = build_corpus(DataConfig(train_files=[str(tmp_path / name)], seq_len=32))
        digests.append(corpus_digest(corpus.train))
    assert digests[0] == digests[1] != digests[2]


def test_bad_shard_directories_fail_at_start(tmp_path):
    tokenize_files([str(make_corpus(tmp_path / "a.txt", 40_000))], str(tmp_path / "s"), shard_tokens=16_000)
    cfg = load_config(None, [f"data.train_files=[{tmp_path / 's'}]"])
    validate(cfg, 2)
    with pytest.raises(ConfigError, match="not streamed") as err:
        validate(load_config(None, [f"data.train_files=[{tmp_path / 's'}]", "data.streaming=true"]), 2)
    assert err.value.field == "data.streaming"
    with pytest.raises(ConfigError, match="written by `codistill-ds tokenize`"):
        validate(load_config(None, [f"data.train_files=[{tmp_path}]"]), 2)
    with pytest.raises(DataError, match="tokenized with 'byte' \\(vocab 256\\); data.tokenizer has vocab 300"):
        build_corpus(cfg.data, type("Tok", (), {"vocab_size": 300})())
    with open(tmp_path / "s" / "tokens_00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="tokens_00001.bin: expected 32000 bytes \\(16000 uint16 tokens\\), found 100"):
        build_corpus(cfg.data)

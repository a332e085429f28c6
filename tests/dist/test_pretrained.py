"""Pretrained weights in the CLI: `model.name_or_path` loads a saved Llama under ZeRO-3, FSDP2,
HSDP and FSDP2 + TP, bit for bit what `from_pretrained` gives, on every group; no rank ever holds
the whole model while loading; bad folders fail with one line.

Launches (real ranks, gloo, CPU), one after the other (2 shared cores):
  EQ   tests/workers/pretrained_check.py on 4 ranks (K = 2 groups of 2): seven cases (fsdp, tp,
       hsdp, zero3, zero2, tied fsdp, tied zero3) built by the CLI's `build_job`
  MEM  tests/workers/pretrained_memory.py on 2 ranks: peak resident memory of loading an 88M
       Llama (fp32, 353 MB) with FSDP2, FSDP2 + TP and ZeRO-3 vs a whole load
Everything is built here: nothing downloads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from launch import WORKERS, run_worker, torchrun

pytestmark = pytest.mark.timeout(900)

VOCAB = 96  # the model's vocabulary: more rows than the tokenizer's ids (a padded vocabulary)


def tokenizer(path: Path, vocab: int) -> int:
    """A BPE tokenizer of at most `vocab` ids trained on a little text; returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(path)
    return len(fast)


def saved_llama(path: Path, *, tied: bool, dtype: torch.dtype = torch.float32, seed: int = 3, **sizes) -> Path:
    """A small Llama with random weights, written by `save_pretrained` (safetensors)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    kw.update(sizes)
    cfg = LlamaConfig(**kw, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("models")
    untied = saved_llama(tmp / "untied", tied=False)
    n_tok = tokenizer(untied, VOCAB - 6)
    tied = saved_llama(tmp / "tied", tied=True, dtype=torch.bfloat16, vocab_size=256)  # byte tokenizer
    return {"untied": untied, "tied": tied, "tokenizer_ids": n_tok}


@pytest.fixture(scope="module")
def equal(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("eq")
    results = run_worker("pretrained_check", 4, out, str(folders["untied"]), str(folders["tied"]), timeout=600)
    return {(r["rank"], run["case"]): run for r in results for run in r["runs"]}


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    big = saved_llama(tmp / "big", tied=False, vocab_size=8192, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=128)
    proc = torchrun(2, [str(WORKERS / "pretrained_memory.py"), str(tmp), str(big)], timeout=600,
                    MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the system
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


CASES = ("fsdp", "tp", "hsdp", "zero3", "zero2", "tied", "tied_z3")
SHARDED = ("fsdp", "tp", "zero3", "tied", "tied_z3")  # S = 2 shards; hsdp (R = 2, D = 1) and zero2 replicate


def test_every_group_starts_bit_for_bit_from_the_checkpoint(equal):
    """Every parameter of every group, gathered over the group, equals from_pretrained's exactly,
    in fp32 (the tied folder is stored in bf16: cast on load, tied again)."""
    for case in CASES:
        groups = set()
        for rank in range(4):
            run = equal[(rank, case)]
            assert run["compared"] == run["params"] and not run["extra"], (case, rank, run)
            assert run["unequal"] == [], (case, rank, run["unequal"])
            assert run["dtypes"] == ["torch.float32"], (case, run["dtypes"])
            groups.add(run["group"])
        assert groups == {0, 1}, case


def test_logits_equal_from_pretrained(equal):
    """Eval-mode logits on a fixed batch: bit for bit, except under TP, where the row-wise
    layers sum partial products over the TP ranks (measured: 1.04e-7)."""
    for (rank, case), run in equal.items():
        if case == "tp":
            assert run["logits_diff"] <= 1e-6, (rank, run["logits_diff"])
        else:
            assert run["logits_equal"], (rank, case, run["logits_diff"])


def test_each_rank_reads_only_what_it_keeps(equal):
    """The elements read from the file equal the elements the rank holds: half the model under
    each sharded layout (S = 2), all of it where the layout replicates it."""
    for (rank, case), run in equal.items():
        assert run["read"] == run["local_numel"], (rank, case, run["read"], run["local_numel"])
        full = run["full_numel"]
        if case in SHARDED:
            assert run["local_numel"] <= 0.51 * full, (rank, case, run["local_numel"], full)
        else:
            assert run["local_numel"] == full, (rank, case)


def test_tokenizer_auto_takes_the_model_folders(equal, folders):
    """`data.tokenizer` left at "auto": the folder's tokenizer (fewer ids than the model's
    padded vocabulary, whose size the run then uses); a folder without one: bytes."""
    assert folders["tokenizer_ids"] < VOCAB
    for rank in range(4):
        assert equal[(rank, "fsdp")]["tokenizer"] == str(folders["untied"])
        assert equal[(rank, "fsdp")]["logits_vocab"] == VOCAB
        assert equal[(rank, "tied")]["tokenizer"] == "byte"


def test_loading_never_holds_the_whole_model(memory):
    """Measured here (88.1M parameters, fp32, 352 MB; S = 2): a whole load peaks at ~378 MB
    (1.07); FSDP2 at ~191 MB (0.54), FSDP2 + TP ~192 MB (0.54), ZeRO-3 ~202 MB (0.57), each
    keeping ~177 MB (0.50): its shards plus the one piece being read. "kept" >= 0.45 also shows
    the shards are the rank's own memory, not lazily paged views of the file's memory map."""
    for r in memory:
        whole = 4 * r["params"]
        assert r["whole"]["peak"] >= 0.95 * whole, r["whole"]
        for kind in ("fsdp", "tp", "zero3"):
            m = r[kind]
            assert m["peak"] < 0.65 * whole, (kind, m["peak"] / whole)
            assert 0.45 * whole <= m["kept"] <= 0.55 * whole, (kind, m["kept"] / whole)  # half, and resident
            assert m["residue"] <= 0.05 * whole, (kind, m["residue"])
        print(f"\nrank {r['rank']}: model {whole / 1e6:.0f} MB, whole load peak {r['whole']['peak'] / 1e6:.0f} MB; "
              + "; ".join(f"{k} peak {r[k]['peak'] / 1e6:.0f} MB ({r[k]['peak'] / whole:.2f}), kept "
                          f"{r[k]['kept'] / 1e6:.0f} MB" for k in ("fsdp", "tp", "zero3")))


def drop_tensor(folder: Path, name: str) -> Path:
    """Rewrite the folder's weights without `name` (a checkpoint of another architecture)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    del state[name]
    save_file(state, path, metadata={"format": "pt"})
    return folder


def test_missing_tensor_stops_every_rank_with_one_line(tmp_path):
    """The CLI on 2 ranks (2 groups): one line per rank naming the field and the tensor, exit 2
    (torchrun reports the ranks' code and exits 1),
    before any process group exists (so no rank waits in a collective)."""
    from launch import REPO, cli

    folder = drop_tensor(saved_llama(tmp_path / "model", tied=False, vocab_size=256), "model.norm.weight")
    proc = cli(2, "train", "--config", str(REPO / "tests" / "tiny_test.yaml"), "--run-dir", str(tmp_path / "run"),
               "--set", f"model.name_or_path={folder}", timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if "codistill-ds: error:" in ln]
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]
    assert len(lines) == 2 and all("'model.name_or_path'" in ln and "model.norm.weight" in ln for ln in lines), lines
    assert "codistill_ds/" not in proc.stderr  # no traceback from our code (torchrun prints its own)

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

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    kw.update(sizes)
    cfg = LlamaConfig(**kw, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.to(dtype).save_pretrained(path)
    return path

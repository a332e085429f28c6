"""One process: peak resident memory of a forward + backward under activation checkpointing MODE.

A Llama of 8 layers (hidden 256, intermediate 1024, vocabulary 256, 8.0M parameters) on 4
sequences of 128 tokens: activations dominate the step. After a warm-up step (gradients
allocated and kept), a thread samples the resident set (/proc/self/statm) every 0.2 ms during
one more forward + backward; run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the
resident set at once. Records the baseline, the peak above it, the loss and a gradient
checksum (the modes must agree). Args: MODE OUT_JSON."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch
import torch.nn.functional as F

from codistill_ds.backends.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointed_layers,
)
from codistill_ds.backends.model import build_model
from codistill_ds.config import ModelConfig

CFG = ModelConfig(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1024, max_seq_len=256)
VOCAB, BATCH, SEQ = 256, 4, 128
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.0002)


def step(model, tokens) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach()


def measure(mode: str) -> dict:
    """The step's peak under MODE in this process (also run by tp_suite.py: one mode per rank)."""
    torch.set_num_threads(1)
    model = build_model(CFG, VOCAB, 0.0, 3)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    step(model, tokens)  # warm-up: gradients allocated
    model.zero_grad(set_to_none=False)
    base = rss()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    loss = step(model, tokens)
    seconds = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    checksum = sum(float(p.grad.double().abs().sum()) for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "wrapped": checkpointed_layers(model), "baseline": base,
            "peak_above_baseline": max(sampler.peak, rss()) - base, "loss": float(loss),
            "grad_checksum": checksum, "params": params, "step_s": seconds}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    facts = measure(mode)
    with open(out, "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main()

"""One run of the ladder: synchronous training at global batch G in one process, one pass at most.

The model, optimizer parameter groups, learning-rate schedule and data stream are the
library's (lib.py); the loop is the CLI's loop for one 1-rank group with two micro-batches of
G/2 (gradient accumulation: the update is the mean gradient over the G sequences, as a
data-parallel job at global batch G). The two micro-batch gradients are also what the noise
scale needs: their squared norms (batch G/2) and that of their mean (batch G) give the
two-batch-size estimator of McCandlish et al. (estimate.py) at every step, before clipping.

The run's JSON (OUT/runs/NAME.json) is rewritten at every evaluation, `done` false until it ends.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import lib
from .estimate import crossing, two_batch_terms
from .settings import RunSpec, eval_steps

DIVERGED = 0.5
"""A run whose validation loss is this far above its starting loss (or not finite) has diverged."""


def config_of(spec: RunSpec) -> lib.Config:
    """The library config of a run (validated by the library)."""
    m = spec.model
    sets = [
        f"seed={spec.seed}", "data.train_files=[]", f"data.max_bytes={json.dumps(spec.max_bytes)}",
        f"data.seq_len={spec.seq_len}", f"data.val_fraction={spec.val_fraction}",
        f"data.micro_batch_size={spec.batch // 2}", "train.grad_accum=2",
        "model.arch=llama", f"model.hidden_size={m['hidden_size']}", f"model.num_layers={m['num_layers']}",
        f"model.num_heads={m['num_heads']}", f"model.intermediate_size={m['intermediate_size']}",
        f"model.max_seq_len={spec.seq_len}",
        f"optim.lr={spec.lr}", f"optim.schedule={spec.schedule}", f"optim.warmup_steps={spec.warmup_steps}",
        f"optim.weight_decay={spec.weight_decay}", f"optim.grad_clip={spec.grad_clip}",
        f"optim.betas=[{spec.betas[0]}, {spec.betas[1]}]", "optim.dropout=0.0",
    ]
    return lib.load_config(None, sets)


_CORPORA: dict[tuple, lib.Corpus] = {}


def corpus_of(cfg: lib.Config) -> lib.Corpus:
    """The tokenized corpus, built once per process (every run of a mode shares it)."""
    d = cfg.data
    key = (tuple(d.train_files), d.max_bytes, d.seq_len, d.val_fraction, d.tokenizer)
    if key not in _CORPORA:
        _CORPORA[key] = lib.build_corpus(d)
    return _CORPORA[key]


def val_windows(corpus: lib.Corpus, n: int) -> torch.Tensor:
    """n validation windows spread evenly over the held-out split (not only its first files)."""
    idx = np.unique(np.linspace(0, len(corpus.val) - 1, n).round().astype(np.int64))
    return corpus.val[idx]


def evaluate(model: torch.nn.Module, windows: torch.Tensor, chunk: int = 64) -> float:
    """Mean next-token loss (nats per byte) over the windows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), chunk):
            batch = windows[i:i + chunk]
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    model.train()
    return total / count


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def train(spec: RunSpec, path: Path, log=print) -> dict:
    """Train the run and write its record to `path`; returns the record."""
    torch.set_num_threads(1)
    cfg = config_of(spec)
    corpus = corpus_of(cfg)
    n_train = len(corpus.train)
    max_steps = n_train // spec.batch  # one pass: window positions [0, max_steps * G) of one epoch
    if max_steps < 1:
        raise SystemExit(f"onepass: {n_train} training windows hold no batch of {spec.batch}")
    val = val_windows(corpus, spec.val_windows)
    model = lib.build_model(cfg.model, corpus.vocab_size, 0.0, spec.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(lib.decay_param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    stream = lib.TrainStream(corpus, spec.seed, 0, 1, 0, 1, spec.batch // 2, 2)
    half = spec.batch // 2

    targets = sorted(spec.targets, reverse=True)
    rec: dict = {
        "spec": spec.key(), "limit": spec.limit, "done": False, "params": lib.count_parameters(model),
        "train_windows": n_train, "val_windows_total": len(corpus.val), "val_windows": len(val),
        "max_steps": max_steps, "evals": [], "noise": [], "crossings": {}, "first_step": None,
    }
    v0 = evaluate(model, val)
    rec["evals"].append({"step": 0, "tokens": 0, "val_loss": v0, "train_loss": None, "lr": 0.0, "wall_s": 0.0})
    schedule = set(eval_steps(spec.eval_ratio, spec.eval_min, max_steps))
    acc = {"n": 0, "gs": 0.0, "gb": 0.0, "g2": 0.0, "tr": 0.0, "ce": 0.0, "clipped": 0, "norm": 0.0}
    began, cpu0, train_s, stop = time.perf_counter(), time.process_time(), 0.0, "one-pass"
    step = 0
    while step < max_steps:
        t0 = time.perf_counter()
        lr = lib.lr_at(step, o.lr, o.warmup_steps, max_steps, o.schedule, o.min_lr)
        lib.set_optimizer_hyperparameters(opt.param_groups, lr, o.weight_decay)
        ces, g1 = [], None
        for m in range(2):
            batch = stream.micro_batch(step, m)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            ce = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            ce.backward()  # grads: g1 after m = 0, g1 + g2 after m = 1
            ces.append(ce.item())
            if m == 0:
                g1 = _flat_grad(params).clone()
        total = _flat_grad(params)
        g2 = total - g1
        gs = 0.5 * (float(g1.dot(g1)) + float(g2.dot(g2)))  # |G_{G/2}|^2, mean of the two halves
        gb = 0.25 * float(total.dot(total))  # |G_G|^2 of the mean gradient
        est_g2, est_tr = two_batch_terms(gs, gb, half, spec.batch)
        for p in params:
            p.grad.mul_(0.5)  # the update's gradient: the mean over the G sequences
        norm = math.sqrt(gb)
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rec["first_step"] is None:
            rec["first_step"] = {"train_loss": sum(ces) / 2, "g_small_sq": gs, "g_big_sq": gb}
        acc["n"] += 1
        acc["gs"] += gs
        acc["gb"] += gb
        acc["g2"] += est_g2
        acc["tr"] += est_tr
        acc["ce"] += sum(ces) / 2
        acc["norm"] += norm
        acc["clipped"] += int(o.grad_clip > 0 and norm > o.grad_clip)
        step += 1
        train_s += time.perf_counter() - t0
        if step not in schedule:
            continue
        v = evaluate(model, val)
        n = acc["n"]
        rec["evals"].append({"step": step, "tokens": step * spec.batch * spec.seq_len, "val_loss": v,
                             "train_loss": acc["ce"] / n, "lr": lr, "wall_s": time.perf_counter() - began})
        rec["noise"].append({"step": step, "steps": n, "val_loss": v, "g_small_sq": acc["gs"] / n,
                             "g_big_sq": acc["gb"] / n, "g2": acc["g2"] / n, "trace": acc["tr"] / n,
                             "grad_norm": acc["norm"] / n, "clipped": acc["clipped"] / n})
        acc = dict.fromkeys(acc, 0)
        curve = [(e["step"], e["val_loss"]) for e in rec["evals"]]
        for t in targets:
            key = f"{t:g}"
            if key not in rec["crossings"]:
                s = crossing(curve, t)
                if s is not None:
                    rec["crossings"][key] = {"steps": s, "tokens": s * spec.batch * spec.seq_len}
        rec.update(steps_run=step, windows_read=step * spec.batch, train_s=train_s,
                   wall_s=time.perf_counter() - began, cpu_s=time.process_time() - cpu0, tokens_per_s=step * spec.batch * spec.seq_len / train_s)
        _write(path, rec)
        if not math.isfinite(v) or v > v0 + DIVERGED:
            stop = "diverged"
            break
        if all(f"{t:g}" in rec["crossings"] for t in targets) and targets:
            stop = "target"
            break
        if spec.limit is not None and targets and step >= spec.limit:
            stop = "slower"
            break
    assert rec["windows_read"] <= n_train, "a run read a training window twice"
    rec.update(done=True, stop=stop)
    _write(path, rec)
    low = f"{targets[-1]:g}" if targets else None
    got = rec["crossings"].get(low, {}).get("steps") if low else None
    log(f"  {spec.name()}: {stop} after {rec['steps_run']} steps, val {rec['evals'][-1]['val_loss']:.4f}"
        + (f", {low} at {got:.0f}" if got else "") + f" ({rec['wall_s']:.0f} s, {rec['tokens_per_s']:.0f} tok/s)")
    return rec


def load(path: Path, spec: RunSpec) -> dict | None:
    """A finished run of these settings that `spec.limit` would not have cut shorter, else None."""
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if not rec.get("done") or rec["spec"] != json.loads(json.dumps(spec.key())):
        return None
    if rec["stop"] == "slower" and (spec.limit is None or rec["limit"] < spec.limit):
        return None  # cut at a tighter limit than this search now allows: train again
    return rec

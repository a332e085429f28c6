"""Value checks of a loaded config against the world size (and vocabulary).

Loading (config.py) only checks types. ``validate`` runs at start on every rank, before any
process group exists, so a bad value fails with one line naming the field instead of a hang in
a collective. It raises the first problem found as a ``ConfigError`` whose ``field`` is the
dotted name. The HF Trainer integration reuses the topology, choice and number checks.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from .config import PACKAGE_ROOT, Config, ConfigError, resolve_path

CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("llama", "gpt2"),
    "data.builtin": ("stdlib",),
    "data.format": ("auto", "text", "jsonl"),
    "codistill.mode": ("logits", "weights"),
    "codistill.route": ("leaders", "rails"),
    "codistill.exchange_batch": ("shared", "train"),
    "codistill.dtype": ("bf16", "fp16", "fp32"),
    "codistill.exchange_backend": ("auto", "nccl", "gloo"),
    "codistill.loss": ("kl", "reverse_kl", "jsd", "mse"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "backend.name": ("deepspeed", "fsdp"),
    "backend.precision": ("auto", "fp32", "bf16"),
}
"""Valid values of every enum-like field."""

_POSITIVE = (
    "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.max_seq_len", "data.seq_len", "data.max_bytes",
    "data.micro_batch_size", "data.exchange_batch_size", "data.val_batches",
    "codistill.interval", "codistill.temperature", "optim.lr", "optim.eps",
    "train.steps", "train.grad_accum", "backend.timeout_s", "backend.peer_timeout_s",
)  # fmt: skip
"""Fields that must be > 0 (None, where allowed, is skipped)."""

_NON_NEGATIVE = (
    "codistill.staleness", "codistill.burn_in", "codistill.ramp", "codistill.topk",
    "codistill.alpha", "optim.min_lr", "optim.warmup_steps", "optim.grad_clip",
    "optim.weight_decay", "train.eval_interval", "train.log_interval", "train.save_interval",
    "train.keep_checkpoints",
)  # fmt: skip
"""Fields that must be >= 0 (0 means off, or "only at the end", where that makes sense)."""


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _require(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ConfigError(name, reason)


def check_topology(cfg: Config, world_size: int) -> None:
    g = cfg.codistill.groups
    _require(world_size >= 1, "world_size", f"world size must be >= 1, got {world_size}")
    _require(g >= 1, "codistill.groups", f"must be >= 1, got {g}")
    if cfg.codistill.enabled:
        _require(
            g >= 2,
            "codistill.groups",
            f"codistillation needs at least 2 groups, got {g}; "
            "set codistill.enabled=false to train one group",
        )
        _require(
            world_size % g == 0,
            "codistill.groups",
            f"world size {world_size} is not divisible by codistill.groups={g}",
        )


def check_choices(cfg: Config) -> None:
    for name, valid in CHOICES.items():
        value = _get(cfg, name)
        _require(value in valid, name, f"got {value!r}; valid values: {', '.join(valid)}")
    _require(
        cfg.codistill.mode != "weights" or cfg.codistill.exchange_batch == "shared",
        "codistill.exchange_batch",
        "mode 'weights' distills on each group's own batch; exchange_batch does not apply "
        "(leave it 'shared')",
    )
    _require(
        cfg.codistill.exchange_batch != "train" or cfg.codistill.staleness == 0,
        "codistill.exchange_batch",
        f"exchange_batch 'train' predicts on the current training batch, so it needs "
        f"codistill.staleness=0 (got {cfg.codistill.staleness})",
    )


def _check_fraction(name: str, value: float, what: str = "") -> None:
    _require(0.0 <= value < 1.0, name, f"{what}must be in [0, 1), got {value}")


def _check_milestones(name: str, pairs: list[tuple[int, float]], fraction: bool) -> None:
    steps = [step for step, _ in pairs]
    ordered = all(a < b for a, b in itertools.pairwise(steps)) and all(s >= 0 for s in steps)
    _require(ordered, name, f"steps must be >= 0 and strictly increasing, got {steps}")
    for step, value in pairs:
        if fraction:
            _check_fraction(name, value, f"value at step {step} ")
        _require(value >= 0, name, f"value at step {step} must be >= 0, got {value}")


def check_numbers(cfg: Config) -> None:
    for name in _POSITIVE:
        value = _get(cfg, name)
        _require(value is None or value > 0, name, f"must be > 0, got {value}")
    for name in _NON_NEGATIVE:
        value = _get(cfg, name)
        _require(value >= 0, name, f"must be >= 0, got {value}")
    opt = cfg.optim
    _check_fraction("data.val_fraction", cfg.data.val_fraction)
    _check_fraction("optim.dropout", opt.dropout)
    for i, beta in enumerate(opt.betas):
        _check_fraction("optim.betas", beta, f"beta{i + 1} ")
    _require(opt.min_lr <= opt.lr, "optim.min_lr", f"min_lr {opt.min_lr} exceeds lr {opt.lr}")
    _check_milestones("optim.weight_decay_milestones", opt.weight_decay_milestones, False)
    _check_milestones("optim.dropout_milestones", opt.dropout_milestones, True)


def _check_model(cfg: Config) -> None:
    m, seq = cfg.model, cfg.data.seq_len
    if m.name_or_path is None:
        _require(
            m.hidden_size % m.num_heads == 0,
            "model.hidden_size",
            f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}",
        )
        kv = m.num_kv_heads or m.num_heads
        _require(
            m.num_heads % kv == 0,
            "model.num_kv_heads",
            f"num_heads {m.num_heads} is not divisible by num_kv_heads {kv}",
        )
    else:
        _require(
            os.path.exists(m.name_or_path),
            "model.name_or_path",
            f"no such config dir or file: {m.name_or_path}",
        )
    _require(
        seq <= m.max_seq_len,
        "data.seq_len",
        f"seq_len {seq} exceeds model.max_seq_len {m.max_seq_len}",
    )


def _check_exchange(cfg: Config, world_size: int, vocab_size: int | None) -> None:
    topk, batch = cfg.codistill.topk, cfg.data.exchange_batch_size
    if vocab_size is not None:
        _require(
            topk <= vocab_size,
            "codistill.topk",
            f"topk {topk} exceeds the vocabulary size {vocab_size}",
        )
    if cfg.codistill.enabled and batch is not None:
        per_group = ranks_per_group(cfg, world_size)
        _require(
            batch % per_group == 0,
            "data.exchange_batch_size",
            f"exchange_batch_size {batch} is not divisible by the {per_group} ranks per "
            f"group (world size {world_size} / {cfg.codistill.groups} groups)",
        )


def _check_paths(cfg: Config) -> None:
    for path in cfg.data.train_files:
        _require(os.path.isfile(path), "data.train_files", f"no such file: {path}")
    tok = cfg.data.tokenizer
    _require(
        tok == "byte" or os.path.isdir(tok),
        "data.tokenizer",
        f"expected 'byte' or a local tokenizer directory, got {tok}",
    )
    if cfg.backend.name == "deepspeed":
        path = cfg.backend.ds_config
        _require(
            os.path.isfile(resolve_path(path)),
            "backend.ds_config",
            f"DeepSpeed config not found: {path} (looked in the current directory "
            f"and in {PACKAGE_ROOT})",
        )
        if cfg.codistill.enabled and cfg.codistill.mode == "weights":
            _require(_zero_stage(resolve_path(path)) == 3, "codistill.mode",
                     f"mode 'weights' sends ZeRO-3 parameter shards; {path} is not ZeRO stage 3")


def _zero_stage(ds_config_path: str) -> int | None:
    try:
        with open(ds_config_path) as f:
            return json.load(f).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError):
        return None


def check_devices(cfg: Config, cuda_available: bool) -> None:
    """Choices that need a GPU, refused on a machine without one before any group exists."""
    _require(
        cfg.codistill.exchange_backend != "nccl" or cuda_available,
        "codistill.exchange_backend",
        "'nccl' needs CUDA devices and this machine has none (torch.cuda.is_available() is "
        "False); use 'gloo' or 'auto'",
    )


def validate(cfg: Config, world_size: int, vocab_size: int | None = None,
             cuda_available: bool | None = None) -> None:
    """Raise the first ``ConfigError`` that would make this config fail on ``world_size`` ranks
    (on this machine: ``cuda_available`` defaults to what torch sees)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    check_topology(cfg, world_size)
    check_choices(cfg)
    check_devices(cfg, cuda_available)
    check_numbers(cfg)
    _check_model(cfg)
    _check_exchange(cfg, world_size, vocab_size)
    _check_paths(cfg)
    _require(
        not (cfg.codistill.enabled and cfg.codistill.mode == "weights" and cfg.train.save_interval > 0),
        "train.save_interval",
        "checkpoints of codistill.mode='weights' are not supported yet (the frozen peer copies "
        "are not saved); set it to 0",
    )
    _require(
        cfg.train.resume in ("auto", "none") or os.path.isdir(cfg.train.resume),
        "train.resume",
        f"expected 'auto', 'none' or a checkpoint or run directory, got {cfg.train.resume!r} "
        "(no such directory)",
    )


def ranks_per_group(cfg: Config, world_size: int) -> int:
    """S: ranks that shard one replica (the whole world when codistillation is off)."""
    return world_size // cfg.codistill.groups if cfg.codistill.enabled else world_size

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

from codistill_ds.config import (
    PACKAGE_DIR,
    PACKAGE_ROOT,
    Config,
    ConfigError,
    resolve_path,
)
from codistill_ds.data.shards import is_shard_dir
from codistill_ds.exchange.wire import UINT16_VOCAB

CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("llama", "gpt2"),
    "model.activation_checkpointing": ("none", "full", "selective"),
    "model.weights": ("auto", "pretrained", "random"),
    "data.builtin": ("stdlib",),
    "data.format": ("auto", "text", "jsonl", "shards"),
    "codistill.mode": ("logits", "weights"),
    "codistill.route": ("leaders", "rails"),
    "codistill.exchange_batch": ("shared", "train"),
    "codistill.dtype": ("bf16", "fp16", "fp32", "fp8"),
    "codistill.index_dtype": ("auto", "uint16", "int32"),
    "codistill.exchange_backend": ("auto", "nccl", "gloo"),
    "codistill.loss": ("kl", "reverse_kl", "jsd", "mse"),
    "codistill.transport": ("world", "torchft"),
    "codistill.targets": ("topk", "samples"),
    "codistill.stale_teachers": ("keep", "drop"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "backend.name": ("deepspeed", "fsdp"),
    "backend.precision": ("auto", "fp32", "bf16"),
}
"""Valid values of every enum-like field."""

_POSITIVE = (
    "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.max_seq_len", "data.seq_len", "data.max_bytes",
    "data.micro_batch_size", "data.exchange_batch_size", "data.val_batches", "data.shuffle_buffer",
    "codistill.interval", "codistill.temperature", "codistill.join_timeout_s",
    "codistill.exchange_timeout_s", "optim.lr", "optim.eps",
    "train.steps", "train.grad_accum", "backend.timeout_s", "backend.peer_timeout_s",
    "parallel.tp", "parallel.replicate",
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
        if cfg.codistill.transport == "torchft":
            check_group_job(cfg)
            return
        _require(
            world_size % g == 0,
            "codistill.groups",
            f"world size {world_size} is not divisible by codistill.groups={g}",
        )


def check_group_job(cfg: Config) -> None:
    """`transport: torchft`: this job is group `group_id` of `groups`; the job's whole world
    shards that one replica, and the peers are reached through the Lighthouse."""
    cd = cfg.codistill
    slots = cd.group_slots
    _require(slots >= cd.groups, "codistill.max_groups", f"must be >= codistill.groups={cd.groups}, got {slots}")
    _require(cd.group_id is not None and 0 <= cd.group_id < slots, "codistill.group_id",
             f"transport 'torchft' needs this job's group id in 0..{slots - 1} "
             f"(codistill.groups={cd.groups}, max_groups={cd.max_groups}), got {cd.group_id}")
    _require(bool(cd.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")), "codistill.lighthouse",
             "transport 'torchft' needs the Lighthouse URL (http://host:port, from `codistill-ds "
             "lighthouse`) in codistill.lighthouse or TORCHFT_LIGHTHOUSE")
    # Every mode runs over torchft (exchange_batch train, route rails, mode weights): what they
    # need the groups to share (group shape, training stream, model) is in the exchange contract,
    # checked against the running groups when a job joins (transport/contract.py).
    _require(cd.exchange_timeout_s < cfg.backend.peer_timeout_s, "codistill.exchange_timeout_s",
             f"{cd.exchange_timeout_s}s must be below backend.peer_timeout_s "
             f"({cfg.backend.peer_timeout_s}s), or the watchdog stops the group while a round waits")


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
    _require(opt.schedule == "constant" or opt.warmup_steps <= cfg.train.steps, "optim.warmup_steps",
             f"{opt.warmup_steps} exceeds train.steps {cfg.train.steps}: the {opt.schedule} decay would end first")
    _check_milestones("optim.weight_decay_milestones", opt.weight_decay_milestones, False)
    _check_milestones("optim.dropout_milestones", opt.dropout_milestones, True)
    cd = cfg.codistill
    groups_named = [g for g, _ in cd.peer_weights]
    slots = cd.group_slots
    _require(len(set(groups_named)) == len(groups_named) and all(0 <= g < slots for g in groups_named),
             "codistill.peer_weights", f"peer groups must be distinct ids in 0..{slots - 1}, got {groups_named}")
    _require(cd.max_groups is None or cd.transport == "torchft", "codistill.max_groups",
             "groups can join a running run only with transport 'torchft' (one job per group)")
    _require(all(w >= 0 for _, w in cd.peer_weights), "codistill.peer_weights",
             f"weights must be >= 0, got {[w for _, w in cd.peer_weights]}")
    _require(cd.peer_guard_ratio == 0 or cd.peer_guard_ratio > 1, "codistill.peer_guard_ratio",
             f"must be 0 (off) or > 1 (a peer this many times worse than me is skipped), got {cd.peer_guard_ratio}")
    _require(cd.secret_file is None or cd.transport == "torchft", "codistill.secret_file",
             "authenticates the group jobs of transport 'torchft'; one job of transport 'world' needs none")


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
    cd, batch = cfg.codistill, cfg.data.exchange_batch_size
    topk = cd.topk
    if vocab_size is not None:
        _require(
            topk <= vocab_size,
            "codistill.topk",
            f"topk {topk} exceeds the vocabulary size {vocab_size}",
        )
        _require(
            cd.index_dtype != "uint16" or vocab_size <= UINT16_VOCAB,
            "codistill.index_dtype",
            f"uint16 ids hold a vocabulary of at most {UINT16_VOCAB:,}, the model's has "
            f"{vocab_size:,}; use 'auto' or 'int32'",
        )
    _require(0.0 < cd.token_fraction <= 1.0, "codistill.token_fraction",
             f"must be in (0, 1], got {cd.token_fraction}")
    _require(cd.targets == "topk" or (cd.loss == "kl" and cd.topk >= 1), "codistill.targets",
             f"sampled targets estimate the forward KL from topk >= 1 draws (loss 'kl'); got loss "
             f"{cd.loss!r}, topk {cd.topk}")
    _require(cd.token_fraction == 1.0 or cd.mode == "logits", "codistill.token_fraction",
             f"a fraction of the predictions travels only with mode 'logits' (got mode {cd.mode!r})")
    if cfg.codistill.enabled and batch is not None:
        per_group, tp = ranks_per_group(cfg, world_size), cfg.parallel.tp
        if tp > 1 and per_group % tp == 0:  # the T ranks of a data rank predict on the same rows
            data_ranks = per_group // tp     # (ExchangeStream splits over data ranks; tp_rows.py)
            _require(batch % data_ranks == 0, "data.exchange_batch_size",
                     f"exchange_batch_size {batch} is not divisible by the {data_ranks} data ranks per group "
                     f"({per_group} ranks / parallel.tp {tp})")
            return
        _require(
            batch % per_group == 0,
            "data.exchange_batch_size",
            f"exchange_batch_size {batch} is not divisible by the {per_group} ranks per "
            f"group (world size {world_size} / {cfg.codistill.groups} groups)",
        )


REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb", "none": None}
"""Valid train.report_to entries -> the package each needs (imported only when used)."""


def check_report_to(targets: list[str]) -> None:
    from importlib.util import find_spec

    for name in targets:
        _require(name in REPORT_TO, "train.report_to", f"got {name!r}; valid values: {', '.join(REPORT_TO)}")
        package = REPORT_TO[name]
        _require(package is None or find_spec(package) is not None, "train.report_to",
                 f"'{name}' needs the {package} package: pip install 'codistill_ds[dashboards]'")
    _require("none" not in targets or len(targets) == 1, "train.report_to",
             f"'none' cannot be combined with other targets, got {targets}")


def _check_data_paths(cfg: Config) -> None:
    """Text/JSONL files, or exactly one token-shard directory (shards.py)."""
    files, d = cfg.data.train_files, cfg.data
    shard_dir = len(files) == 1 and is_shard_dir(files[0])
    if d.format == "shards" or (files and os.path.isdir(files[0])):
        _require(shard_dir, "data.train_files", f"expected one directory written by `codistill-ds "
                 f"tokenize` (holding index.json), got {files}")
        _require(not d.streaming, "data.streaming", "token shards are memory-mapped, not streamed; "
                 "set data.streaming=false")
        return
    for path in files:
        _require(os.path.isfile(path), "data.train_files", f"no such file: {path}")
    _require(not d.streaming or bool(files), "data.streaming",
             "streams data.train_files, which is empty (the built-in corpus is read in memory)")


def _check_paths(cfg: Config) -> None:
    _check_data_paths(cfg)
    tok = cfg.data.tokenizer
    _require(
        tok in ("auto", "byte") or os.path.isdir(tok),
        "data.tokenizer",
        f"expected 'auto', 'byte' or a local tokenizer directory, got {tok}",
    )
    if cfg.backend.name == "deepspeed":
        path = cfg.backend.ds_config
        _require(
            os.path.isfile(resolve_path(path)),
            "backend.ds_config",
            f"DeepSpeed config not found: {path} (looked in the current directory, "
            f"in {PACKAGE_ROOT} and in {PACKAGE_DIR})",
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


def check_parallel(cfg: Config, world_size: int) -> None:
    """S = replicate x dp_shard x tp must lay out, and the backend must be able to carry it (the
    model's own divisibility by T is checked against its config: backends/tensor_parallel.py)."""
    p, S = cfg.parallel, ranks_per_group(cfg, world_size)
    if S % (p.replicate * p.tp):
        field = "parallel.tp" if S % p.tp else "parallel.replicate"
        raise ConfigError(field, f"a group of {S} ranks is not divisible by parallel.replicate {p.replicate} x "
                          f"parallel.tp {p.tp} = {p.replicate * p.tp} (world {world_size} = codistill "
                          f"{world_size // S} x replicate {p.replicate} x dp_shard D x tp {p.tp})")
    if p.tp > 1:
        _require(cfg.model.arch == "llama" or cfg.model.name_or_path is not None, "parallel.tp",
                 "tensor parallelism splits Llama-style blocks; GPT-2's fused Conv1D is not supported: "
                 "use model.arch llama, or parallel.tp 1 with FSDP2/ZeRO-3")
        _require(cfg.codistill.mode == "logits" or not cfg.codistill.enabled, "parallel.tp",
                 "codistill.mode 'weights' with tensor parallelism is not supported yet; use mode 'logits'")
        if cfg.backend.name == "deepspeed":
            stage = _zero_stage(resolve_path(cfg.backend.ds_config))
            _require(stage in (0, 1, 2), "parallel.tp",
                     f"DeepSpeed AutoTP runs with ZeRO-1/2 and {cfg.backend.ds_config} is ZeRO stage {stage}; "
                     "use ds_configs/zero1.json or zero2.json, or backend.name fsdp for TP with sharded parameters")
    if p.tp > 1 and cfg.codistill.enabled:
        _require(cfg.codistill.exchange_batch == "shared", "parallel.tp",
                 "exchange_batch 'train' with tensor parallelism is not supported yet; use 'shared'")
        from codistill_ds.exchange.sampling import positions_per_sequence

        data_ranks = S // (p.replicate * p.tp) * p.replicate
        batch = cfg.data.exchange_batch_size or cfg.data.micro_batch_size * data_ranks
        tokens = batch // data_ranks * positions_per_sequence(cfg.data.seq_len, cfg.codistill.token_fraction)
        _require(tokens % p.tp == 0, "data.exchange_batch_size",
                 f"each data rank predicts on {tokens} exchange tokens, not divisible by parallel.tp {p.tp} "
                 "(each TP rank sends an equal 1/T of them)")
    _require(p.replicate == 1 or cfg.backend.name == "fsdp", "parallel.replicate",
             f"HSDP (replicate {p.replicate}) needs backend.name fsdp; DeepSpeed ZeRO shards over the whole group")


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
    check_parallel(cfg, world_size)
    check_report_to(cfg.train.report_to)
    _require(
        not (cfg.codistill.enabled and cfg.codistill.mode == "weights" and cfg.train.save_interval > 0),
        "train.save_interval",
        "checkpoints of codistill.mode='weights' are not supported yet (the frozen peer copies "
        "are not saved); set it to 0",
    )
    _require(
        not (cfg.codistill.enabled and cfg.codistill.mode == "weights" and cfg.train.resume != "none"),
        "train.resume",
        "codistill.mode='weights' cannot resume: its teachers (the peers' frozen copies) are not "
        "in checkpoints, so a resumed run would distill toward fresh ones; start a new run",
    )
    _require(
        cfg.train.resume in ("auto", "none") or os.path.isdir(cfg.train.resume),
        "train.resume",
        f"expected 'auto', 'none' or a checkpoint or run directory, got {cfg.train.resume!r} "
        "(no such directory)",
    )


def ranks_per_group(cfg: Config, world_size: int) -> int:
    """S: ranks that shard one replica (the whole world when codistillation is off, or when the
    job is one group of `transport: torchft`)."""
    if not cfg.codistill.enabled or cfg.codistill.transport == "torchft":
        return world_size
    return world_size // cfg.codistill.groups

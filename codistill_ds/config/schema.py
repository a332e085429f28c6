"""The one typed configuration of a codistillation run: one dataclass per section.

Each field carries its docstring right under it (the README's configuration reference and the
Trainer's `--codistill_*` flags are generated from them, `config/doc.py`). Loading, the merge
rule and `--set` overrides are `config/load.py`; value checks against the world size and the
vocabulary are `config/validation.py`.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
"""Where relative paths fall back to: the repo root that holds ``ds_configs/`` (a checkout or
an editable install)."""
PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The installed package; a wheel ships ``ds_configs/`` inside it (pyproject.toml)."""


class ConfigError(ValueError):
    """A config that cannot run; ``field`` is the dotted name of the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"config field '{field}': {reason}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.field, self.reason))


@dataclass
class ModelConfig:
    arch: str = "llama"
    """Architecture built from the sizes below ("llama" | "gpt2") when name_or_path is None."""
    name_or_path: str | None = None
    """A local Hugging Face folder (or a config JSON file). Its config defines the model; when
    the folder also holds weights (safetensors), every group starts from them (model.weights),
    each rank reading only its own shards, and `data.tokenizer: auto` takes the folder's
    tokenizer. None builds `arch` from the sizes below with random weights."""
    weights: str = "auto"
    """Where the starting weights come from: "auto" (name_or_path's safetensors when the folder
    has them, else random) | "pretrained" (name_or_path's, required) | "random" (a seeded random
    initialization of the architecture, ignoring any weights in the folder)."""
    hidden_size: int = 64
    """Width; the tiny default trains on one CPU core in minutes."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; must divide hidden_size."""
    num_kv_heads: int | None = None
    """Grouped-query KV heads (llama); None means one per attention head."""
    intermediate_size: int = 256
    """MLP width."""
    max_seq_len: int = 256
    """Position table size; data.seq_len may not exceed it."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them: "none" | "full" (every
    transformer block) | "selective" (every other block: about half the activation memory for
    about half the recompute). Applied per block before sharding; the losses are unchanged."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Text or JSONL files, or one directory of token shards written by `codistill-ds tokenize`
    (memory-mapped, never loaded whole); empty uses the built-in corpus so a run needs no download."""
    builtin: str = "stdlib"
    """The only built-in corpus: the installed Python standard library's .py source."""
    format: str = "auto"
    """How to read train_files: "auto" (a shard directory, else by file extension) | "text" |
    "jsonl" | "shards"."""
    streaming: bool = False
    """Read text/JSONL train_files through `datasets` streaming while training instead of
    tokenizing them whole at start (streaming.py says what changes: document-level group split,
    buffered shuffle, resume by re-reading)."""
    shuffle_buffer: int = 10_000
    """Streaming only: documents in datasets' shuffle buffer (memory grows with it)."""
    text_field: str = "text"
    """The JSONL key that holds the document text."""
    tokenizer: str = "auto"
    """"auto" (model.name_or_path's tokenizer when that folder has one, else "byte") | "byte"
    (UTF-8 bytes, vocab 256, nothing to download) | a local HF tokenizer directory."""
    seq_len: int = 128
    """Tokens per training sequence."""
    max_bytes: int | None = 2_000_000
    """Corpus cap, so the tiny default stays in the paper's many-passes regime; None = all."""
    val_fraction: float = 0.05
    """Tail of the corpus held out for validation, identical for every group."""
    micro_batch_size: int = 4
    """Sequences per rank per micro-step."""
    exchange_batch_size: int | None = None
    """Sequences per group per exchange, split over its ranks; None = micro_batch_size x ranks."""
    val_batches: int = 8
    """Micro-batches per rank per evaluation; bounds evaluation time."""


@dataclass
class CodistillConfig:
    enabled: bool = True
    """False trains one ordinary data-parallel model over the whole world (the baseline)."""
    groups: int = 2
    """K replicas; the world is split into K contiguous groups of equal size."""
    mode: str = "logits"
    """What crosses groups: "logits" (predictions on a shared batch) | "weights" (parameter
    shards to frozen sharded teachers; needs ZeRO-3 or FSDP2)."""
    route: str = "leaders"
    """Exchange path: "leaders" (one cross-group link per group) | "rails" (rank r to rank r)."""
    interval: int = 1
    """Optimizer steps between exchanges; the paper tolerates 50 to 2,500."""
    staleness: int = 0
    """Steps after an exchange before its peer logits are used, to overlap communication."""
    async_exchange: bool = True
    """With staleness > 0, post each exchange without blocking so communication overlaps the
    next `staleness` steps; false blocks at posting time (the synchronous reference: same
    targets, same losses, no overlap)."""
    exchange_batch: str = "shared"
    """Which tokens the groups predict on: "shared" (a common exchange stream, docs/design.md's
    default: only logits cross groups) | "train" (each group's own current training batch, as in
    Anil et al.: peers predict on my batch and I distill on the logits I train on, no extra
    student forward; needs staleness 0)."""
    topk: int = 32
    """Logit entries kept per token (rest mass as one tail bucket); 0 sends the full vocabulary."""
    dtype: str = "bf16"
    """Wire dtype of exchanged values: "bf16" | "fp16" | "fp32" | "fp8" (e4m3, 1 byte per value
    plus one power-of-two scale per token, 1 byte; within 2^-4 relative of the fp32 value)."""
    index_dtype: str = "auto"
    """Wire dtype of top-k ids: "auto" (uint16 when the vocabulary has <= 65,536 entries, else
    int32) | "uint16" | "int32". Ids are lossless either way; uint16 halves their bytes."""
    targets: str = "topk"
    """What each position's prediction travels as: "topk" (the k largest entries, the rest of the
    mass as one tail bucket) | "samples" (k ids drawn from the teacher at temperature T with their
    log-probabilities: an unbiased estimate of the forward KL and its gradient, where top-k is
    biased; Anshumann et al., ACL 2025; needs loss "kl" and topk >= 1 draws)."""
    token_fraction: float = 1.0
    """Fraction of the exchanged predictions that travel, in (0, 1]. exchange_batch "shared": of
    each exchange sequence's positions, drawn from (seed, exchange index), the same in every group
    (sampling.py). exchange_batch "train": of each peer batch's sequences, whole (the first
    ceil(f x b) of the micro-batch): a causal model's prediction at a position needs every earlier
    token, so only whole sequences shrink the teacher's forward, by f, with the bytes."""
    exchange_backend: str = "auto"
    """Backend of the cross-group process groups (leaders, rails, the exchange's own group):
    "auto" (nccl on CUDA, gloo on CPU) | "nccl" | "gloo" (the payload travels from host memory:
    across sites, or two groups sharing one GPU, which one NCCL communicator cannot span)."""
    loss: str = "kl"
    """Distillation divergence: "kl" (forward) | "reverse_kl" | "jsd" | "mse" (on logits)."""
    temperature: float = 1.0
    """Softens both distributions before the divergence."""
    alpha: float = 1.0
    """Weight of the distillation term once ramped in. Per group: with transport torchft each
    group's job has its own config, so a large model can distill less from a small peer."""
    peer_weights: list[tuple[int, float]] = field(default_factory=list)
    """(peer group, weight) pairs: the distillation term is the weighted mean over the peers
    present (unlisted peers weigh 1; a weight of 0 ignores that peer)."""
    burn_in: int = 0
    """Steps with alpha = 0: peers' early predictions are noise."""
    ramp: int = 0
    """Steps over which alpha rises linearly from 0 after burn-in."""
    same_init: bool = False
    """All groups start from identical weights; off, each group draws its own initialisation.
    With pretrained weights every group starts from the checkpoint either way, and this only
    decides whether the groups also share the seed of their other random draws (dropout)."""
    ignore_index: int = -100
    """Label value whose tokens get neither CE nor distillation loss."""
    transport: str = "world"
    """How groups reach each other: "world" (one job holds every group; the exchange runs over
    that job's process groups, and one dead rank stops every group) | "torchft" (each group is its
    own torchrun/deepspeed job; groups meet through a torchft Lighthouse, one quorum per exchange
    round, and a dead or stopped group only costs the others its predictions)."""
    group_id: int | None = None
    """transport torchft: which group this job trains (0 .. groups-1, or up to max_groups-1)."""
    max_groups: int | None = None
    """transport torchft: the most groups that may ever run at once; groups with ids from
    `groups` up to max_groups-1 may join while the others run (every job of the run sets the same
    value: it splits the training data into max_groups shards). None: `groups`, no growth."""
    lighthouse: str | None = None
    """transport torchft: the Lighthouse URL, http://host:port (`codistill-ds lighthouse`);
    None reads the TORCHFT_LIGHTHOUSE environment variable, as torchft does."""
    join_timeout_s: float = 120.0
    """transport torchft: a job waits up to this long at start for groups 0..groups-1 (not for a
    group that announced it retired), so that its first exchange has every peer (a group
    restarted while the others run finds them at their next round); after it, the job starts
    with whoever is present."""
    stale_teachers: str = "keep"
    """mode weights, transport torchft: a peer missing from the latest weight round "keep"s its
    last weights as a stale teacher (the papers distill from teachers thousands of steps old) |
    "drop": it is left out until it is back. A peer never received is never a teacher."""
    exchange_timeout_s: float = 30.0
    """transport torchft: the longest one round may block on a peer that stopped answering (the
    gloo timeout of the cross-group process group, and the longest wait for a quorum). The round is
    then dropped and training goes on; keep it below backend.peer_timeout_s."""
    peer_guard_ratio: float = 0.0
    """Peer guard: skip a peer for a round when the training loss it reports, or the loss of its
    predictions on the exchange batch's own next tokens (averaged over its recent rounds),
    exceeds this times mine (e.g. 2; counted in `skipped_reasons` as "loss" / "labels"); 0 turns
    the guard off. Malformed and NaN payloads are skipped either way."""
    secret_file: str | None = None
    """transport torchft: a file holding the shared secret (>= 16 bytes) that proves membership:
    every job signs its quorum data and payloads with it (HMAC-SHA256) and refuses members that
    cannot; None reads the CODISTILL_SECRET environment variable, else no authentication. The
    secret itself is never written to config.yaml, metrics or logs."""

    @property
    def group_slots(self) -> int:
        """Group ids this run may use, and the shards its training data is split into:
        max_groups (transport torchft: groups may join while the others run), else groups."""
        return self.max_groups if self.max_groups is not None and self.transport == "torchft" else self.groups


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr: float = 3e-4
    """Floor the cosine/linear decay ends at."""
    schedule: str = "cosine"
    """Decay after warmup: "constant" | "cosine" | "linear"."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    weight_decay: float = 0.1
    """Codistillation regularises by itself, so it matches sync training only with less of this."""
    weight_decay_milestones: list[tuple[int, float]] = field(default_factory=list)
    """Piecewise-constant schedule: sorted (step, value) pairs, each holding from its step on."""
    dropout: float = 0.0
    """Model dropout; another regulariser to reduce under codistillation."""
    dropout_milestones: list[tuple[int, float]] = field(default_factory=list)
    """Piecewise-constant dropout schedule, like weight_decay_milestones."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps, the unit of every interval in this config."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    eval_interval: int = 50
    """Steps between validations; 0 = only at the end."""
    log_interval: int = 10
    """Steps between metrics.jsonl records."""
    save_interval: int = 0
    """Steps between checkpoints; 0 = none (ZeRO checkpoints are world-wide barriers)."""
    resume: str = "none"
    """"auto" (newest complete checkpoint under run_dir/checkpoints, or a fresh start) | "none" |
    a checkpoint dir (run_dir/checkpoints/step_N) or a run dir. Restarts under torchrun
    (TORCHELASTIC_RESTART_COUNT > 0) always resume "auto"; see checkpoint.py."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept under run_dir/checkpoints (oldest deleted first); 0 keeps all."""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Dashboards besides metrics.jsonl, each group's leader writing its group: "tensorboard"
    (run_dir/tb/group{g}) | "wandb" (an offline run per group under run_dir/wandb unless
    WANDB_MODE says otherwise) | "none"."""


@dataclass
class BackendConfig:
    name: str = "deepspeed"
    """Sharding engine: "deepspeed" (ZeRO over the group via mpu) | "fsdp" (FSDP2 shard mesh)."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; relative paths try the current directory, then the repo/package root."""
    precision: str = "auto"
    """Compute dtype: "auto" (bf16 on CUDA with bf16 support, else fp32) | "fp32" | "bf16"."""
    timeout_s: float = 600.0
    """Process-group timeout: long enough for ZeRO-3 startup, short enough to surface a hang."""
    peer_timeout_s: float = 180.0
    """Longest a training step (its exchange included) may take before this rank declares a peer
    rank or group dead and exits with a message naming it; startup, checkpoint save and load get
    timeout_s instead. See health.py."""
    fsdp_cpu_offload: bool = False
    """FSDP2: keep sharded parameters, gradients and optimizer state in host memory."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3-like); False keeps them (ZeRO-2-like)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel ranks inside a group (T): attention heads, KV heads, the MLP and the
    vocabulary are split T ways (backend fsdp: FSDP2 + DTensor; backend deepspeed: AutoTP with
    ZeRO-1/2). TP ranks are innermost and contiguous in the world: keep T within a node."""
    replicate: int = 1
    """HSDP replicas inside a group (R, backend fsdp): parameters are sharded over
    D = S / (R x T) ranks and replicated R times, gradients all-reduced across the replicas: the
    usual shape for a group that spans R nodes."""


@dataclass
class Config:
    seed: int = 1234
    """Base seed of every random choice; per-group seeds derive from it."""
    run_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, summary.json and checkpoints go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The replica every group trains (all groups share one architecture)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and batch shapes."""
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    """Groups, exchange and distillation loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, learning-rate schedule and the regularisation schedules."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop lengths and intervals."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """Sharding engine inside each group."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Model parallelism inside each group: S = replicate x dp_shard x tp ranks per group."""



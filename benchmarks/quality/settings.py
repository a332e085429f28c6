"""What the quality benchmark runs: sizes (modes), regimes (corpus, budget, arms) and arms.

An arm is one way of training on 2 ranks at the same per-rank batch; a regime is a corpus and a
budget shared by its arms; a mode scales everything (smoke: seconds, the end-to-end test;
quick: minutes; full: the published numbers, hours on 2 CPU cores).

Regimes (full mode):

    shakespeare   data-limited, the seed paper's regime (Sodhani et al., arXiv 2010.02838):
                  the first 100 KB of tinyshakespeare, many passes, every arm trained until
                  its validation loss has clearly passed its minimum or the cap (1,000 updates)
    compression   the same data and budget cut to 500 updates: codistillation's wire formats
                  (top-k, fp8 values, token fraction) against its default
    token         token-limited: one pass over tinyshakespeare interleaved with as much Python
                  standard-library source (2.2 MB), no arm sees a sequence twice; then what
                  Anil et al. and the seed paper suggest to close the gap
    stdlib        data-limited on a text of another kind: the first 100 KB of the built-in
                  Python standard-library corpus
    hetero        a small model (about a third of the parameters) codistilled with the
                  benchmark model, as two jobs over `transport: torchft` (hetero.py)

One-pass regimes (quick mode; issue 23): `onepass-bB` trains every arm for one pass over the
whole built-in standard-library corpus (12 MB here: no arm reads a window twice) with per-group
batch B = 32, 64, 128 sequences (about 1x, 2x and 4x the quick model's critical batch, measured
by `python -m benchmarks.onepass`), the learning rate tuned for each arm's batch, linear warm-up
then constant, and the same weight decay for every arm (no token is seen twice: the
data-limited regularization adjustment has nothing to correct). Sync at 2B (the same 2 ranks as
one data-parallel job), codistill K=2 (each group B, disjoint halves), sync at B (`sync-half`:
the same ranks, equal updates, half the tokens), independent, DiLoCo H = 10 and 50; the FLOPs
and CPU time of each update are reported beside the loss (report.py, bill.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

NPROC = 2
"""Ranks per run: sync is 1 group x 2 ranks, codistill arms are 2 groups x 1 rank, DiLoCo is 2
workers of 1 rank."""
BASE_SEED = 1234

BASELINE_REG: dict[str, object] = {"optim.weight_decay": 0.1, "optim.dropout": 0.0}
"""docs/design.md's reference: AdamW weight decay 0.1, no dropout (sync, DiLoCo, unadjusted arms)."""
ADJUSTED_REG: dict[str, object] = {"optim.weight_decay": 0.01, "optim.dropout": 0.0}
"""Codistillation regularizes by itself (Sodhani et al.): ten times less weight decay."""


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int = 4


@dataclass(frozen=True)
class StopRule:
    """When a run has clearly passed its minimum: every model's last `evals` validation losses
    are at least `rise` above its best, and the best is at least `patience` updates old. The
    schedule is fixed by the cap, so stopping only skips updates past a known minimum."""

    rise: float = 0.03
    patience: int = 100
    evals: int = 2

    def passed(self, histories: list[list[tuple[int, float]]]) -> bool:
        """True when every model's (step, val_loss) history has passed its minimum."""
        if not histories:
            return False
        for hist in histories:
            if len(hist) < self.evals + 1:
                return False
            best_step, best = min(hist, key=lambda sv: sv[1])
            last = hist[-self.evals:]
            if last[-1][0] - best_step < self.patience or any(v < best * (1 + self.rise) for _, v in last):
                return False
        return True


@dataclass(frozen=True)
class Regime:
    """A corpus and a budget that every arm of the regime shares."""

    name: str
    corpus: str
    """"text" (the --data file), "stdlib" (the built-in corpus) or "mixed" (corpora.py)."""
    max_bytes: int | None
    """None: the whole corpus (the one-pass regimes' standard-library source)."""
    steps: int
    """Updates per rank: the cap (and the length of the cosine schedule)."""
    arms: tuple[str, ...]
    seeds: int = 1
    """Seeds of the arms in GOAL_ARMS; the other arms get `side_seeds`."""
    side_seeds: int = 1
    stop: StopRule | None = None
    """None: every arm trains `steps` updates (the token-limited regime: one pass)."""
    val_windows: int = 64
    """Validation sequences scored by every arm (a multiple of 2 x micro_batch x batch_scale)."""
    val_fraction: float = 0.1
    micro_batch: int | None = None
    """Per-rank batch b of every arm (None: the mode's)."""
    lr: tuple[tuple[int, float], ...] = ()
    """(sequences per model per update, learning rate): each arm trains at the rate tuned for
    its own batch (one-pass regimes); empty: the mode's 3e-3 cosine schedule."""
    eval_interval: int | None = None
    """Updates between evaluations (None: the mode's)."""
    sets: tuple[tuple[str, object], ...] = ()
    """Overrides of every arm of the regime, before the arm's own `sets`."""
    seeded: tuple[str, ...] | None = None
    """The arms that get `seeds` (None: GOAL_ARMS)."""
    timeout_s: float | None = None
    """A run's time limit (None: the mode's)."""


@dataclass(frozen=True)
class Mode:
    """Sizes shared by every regime of a setting."""

    name: str
    model: ModelSize
    small: ModelSize
    """The small peer of the hetero regime (about a third of `model`'s parameters)."""
    seq_len: int
    micro_batch: int
    """Sequences per rank per update: b for each codistilled model, 2b global for sync."""
    eval_interval: int
    stale_interval: int
    regimes: dict[str, Regime]
    log_interval: int = 1
    """Every step: agreement is only recorded when an exchange step is also a logged step."""
    warmup_steps: int = 20
    run_timeout_s: float = 4 * 3600.0


@dataclass(frozen=True)
class Arm:
    name: str
    codistill: bool = True
    alpha: float = 1.0
    adjusted: bool = True
    sparse: bool = False
    """Exchange only every `stale_interval` steps instead of every step."""
    weights: bool = False
    """Exchange weights (frozen peer copies predict on my batch every step), not logits."""
    diloco: int = 0
    """> 0: torchft DiLoCo with this many inner steps between outer steps (diloco.py)."""
    batch_scale: int = 1
    """Per-rank batch x this, updates / this: the same tokens with fewer, larger updates."""
    batch_div: int = 1
    """Per-rank batch / this at the same updates: fewer tokens per update (sync at batch b)."""
    small: bool = False
    """Train the mode's small model instead of the benchmark model (hetero regime)."""
    sets: tuple[tuple[str, object], ...] = ()
    """Further `--set` overrides that define the arm (compression, tuning attempts)."""
    special: str = ""
    """"pair" (the benchmark model and the small one as two torchft jobs) or "offline" (the
    small model distilled from a trained teacher): hetero.py runs these."""
    note: str = ""


def _arms(*arms: Arm) -> dict[str, Arm]:
    return {a.name: a for a in arms}


SHARED = (("codistill.exchange_batch", "shared"),)
"""A shared exchange stream instead of each model's own batch (token_fraction needs it)."""

ARMS: dict[str, Arm] = _arms(
    Arm("sync", codistill=False, adjusted=False, note="1 group x 2 ranks, global batch 2b"),
    Arm("codistill", note="2 groups x 1 rank, peers' top-32 logits on my batch every step"),
    Arm("codistill-unadjusted", adjusted=False, note="codistill with sync's weight decay 0.1"),
    # alpha = 0 ignores the peers, so how often they predict cannot change training: a sparse
    # exchange only samples the agreement of two independent models, at a fraction of the cost.
    Arm("independent", alpha=0.0, sparse=True, note="alpha 0: no distillation"),
    Arm("codistill-stale", sparse=True, note="logits only every stale_interval steps"),
    Arm("codistill-stale-weights", sparse=True, weights=True,
        note="peer weights every stale_interval steps, frozen copy predicts every step"),
    Arm("diloco-h10", codistill=False, adjusted=False, diloco=10, note="torchft DiLoCo, H=10"),
    Arm("diloco-h50", codistill=False, adjusted=False, diloco=50, note="torchft DiLoCo, H=50"),
    Arm("diloco-h100", codistill=False, adjusted=False, diloco=100, note="torchft DiLoCo, H=100"),
    # Compression: the wire formats of the exchange (uint16 ids are the default with the byte
    # vocabulary, index_dtype auto, in every codistill arm).
    Arm("codistill-top8", sets=(("codistill.topk", 8),), note="top-8 bf16"),
    Arm("codistill-full", sets=(("codistill.topk", 0),), note="full 256-entry distribution, bf16"),
    Arm("codistill-fp8", sets=(("codistill.dtype", "fp8"),), note="top-32 fp8 values"),
    Arm("codistill-top1-fp8", sets=(("codistill.topk", 1), ("codistill.dtype", "fp8")),
        note="the most compact wire: top-1 fp8"),
    Arm("codistill-shared", sets=SHARED, note="shared exchange stream (token_fraction's baseline)"),
    Arm("codistill-shared-tf25", sets=SHARED + (("codistill.token_fraction", 0.25),),
        note="shared stream, a quarter of the positions travel"),
    # Token-limited attempts (Anil et al.; Sodhani et al.).
    Arm("codistill-alpha0.5", sets=(("codistill.alpha", 0.5),), note="alpha 0.5"),
    Arm("codistill-alpha0.25", sets=(("codistill.alpha", 0.25),), note="alpha 0.25"),
    Arm("codistill-alpha0.1", sets=(("codistill.alpha", 0.1),), note="alpha 0.1"),
    Arm("codistill-alpha2", sets=(("codistill.alpha", 2.0),), note="alpha 2"),
    Arm("codistill-burnin", sets=(("codistill.burn_in", 100),), note="alpha 0 for 100 updates"),
    Arm("codistill-t2", sets=(("codistill.temperature", 2.0),), note="temperature 2"),
    Arm("codistill-interval5", sets=(("codistill.interval", 5),), note="logits every 5th update"),
    Arm("codistill-weights10", weights=True, sets=(("codistill.interval", 10),),
        note="peer weights every 10 updates, frozen copy predicts every step"),
    Arm("sync-b32", codistill=False, adjusted=False, batch_scale=2, note="global batch 4b, half the updates"),
    Arm("codistill-b32", batch_scale=2, note="batch 2b per group, half the updates"),
    # One-pass regimes (issue 23): sync at the per-group batch, the same ranks, equal updates.
    Arm("sync-half", codistill=False, adjusted=False, batch_div=2,
        note="global batch b (b/2 per rank), equal updates: half the tokens"),
    Arm("sync-b64", codistill=False, adjusted=False, batch_scale=4, note="global batch 8b, a quarter of the updates"),
    Arm("codistill-b64", batch_scale=4, note="batch 4b per group, a quarter of the updates"),
    # Hetero regime (hetero.py runs the pair and the offline student).
    Arm("small-independent", small=True, alpha=0.0, sparse=True, note="two small models alone (alpha 0)"),
    Arm("hetero-pair", sets=SHARED, special="pair",
        note="group 0 the benchmark model, group 1 the small one, two jobs over transport torchft"),
    Arm("small-offline", small=True, special="offline",
        note="the small model distilled every step from a frozen sync-trained benchmark model"),
)

GOAL_ARMS = ("sync", "codistill", "diloco-h10", "diloco-h50", "diloco-h100")
"""The arms the goals compare: they get `Regime.seeds`, the others `side_seeds`."""

FULL_MAIN = ("sync", "codistill", "independent", "diloco-h10", "diloco-h50", "diloco-h100")
COMPRESSION = ("codistill", "codistill-top8", "codistill-full", "codistill-fp8", "codistill-top1-fp8",
               "codistill-shared", "codistill-shared-tf25")
TOKEN = ("sync", "codistill", "independent", "diloco-h50", "codistill-alpha0.5", "codistill-alpha2",
         "codistill-burnin", "codistill-t2", "codistill-interval5", "codistill-weights10",
         "sync-b32", "codistill-b32")
SMOKE = ("sync", "codistill", "independent", "codistill-stale-weights", "diloco-h10", "codistill-top1-fp8")
"""One arm of each kind: the stale and unadjusted arms differ from these by flags only."""
HETERO = ("sync", "independent", "codistill-shared", "hetero-pair", "small-independent", "small-offline")
SIDE = ("codistill-unadjusted", "codistill-stale", "codistill-stale-weights")

ONEPASS = ("sync", "codistill", "sync-half", "independent", "diloco-h10", "diloco-h50")
ONEPASS_SEEDED = ("sync", "codistill")
"""Two seeds for the goal's pair; one for the others."""
ONEPASS_LR: tuple[tuple[int, float], ...] = (
    (16, 2e-3), (32, 2.828e-3), (64, 4e-3), (128, 5.657e-3), (256, 8e-3))
"""Learning rate per batch (sequences per model per update): the critical-batch ladder's
(`benchmarks/onepass`, warm-up 20 then constant, AdamW betas 0.9/0.95, weight decay 0.1);
its first guesses lr = 1e-3 x 2^(j/2), square-root scaling from 2.83e-3 at 32."""
ONEPASS_SETS: tuple[tuple[str, object], ...] = (
    ("optim.schedule", "constant"), ("optim.betas", [0.9, 0.95]), ("optim.weight_decay", 0.1),
    ("optim.dropout", 0.0))
"""The ladder's recipe for every arm (AdamW betas, weight decay and schedule)."""
ONEPASS_LR_TUNED: tuple[tuple[int, float], ...] = ((64, 2.828e-3), (128, 2.828e-3), (256, 4e-3))
"""The ladder's best learning rate at 64, 128 and 256 sequences, searched on a sqrt(2) grid from
a quarter to twice the first guess (steps to val 1.6: 314 against the first guess's 333 at 64, 238
against 266 at 128, 196 against 318 at 256). onepass-b128-tuned uses the 128 and 256 rates."""


def onepass(batch: int, eval_interval: int, arms: tuple[str, ...] = ONEPASS, seeds: int = 2,
            max_bytes: int | None = None, val_windows: int = 256, val_fraction: float = 0.02) -> Regime:
    """One pass over the standard-library corpus at per-group batch `batch` (steps 0: as many
    updates of sync's 2 x batch as the training split holds, computed from the corpus)."""
    return Regime(f"onepass-b{batch}", "stdlib", max_bytes, 0, arms, seeds=seeds, val_windows=val_windows,
                  val_fraction=val_fraction, micro_batch=batch, lr=ONEPASS_LR, eval_interval=eval_interval,
                  sets=ONEPASS_SETS, seeded=ONEPASS_SEEDED, timeout_s=8 * 3600.0)


BENCH = ModelSize(128, 4, 512)
"""docs/design.md's reference model: a 1.1M-parameter byte-level Llama."""

MODES: dict[str, Mode] = {
    # Tiny everything: the end-to-end test, seconds per arm; every kind of arm once.
    "smoke": Mode("smoke", ModelSize(32, 2, 64), ModelSize(32, 1, 32), seq_len=32, micro_batch=4,
                  eval_interval=10, stale_interval=10, warmup_steps=5, run_timeout_s=300, regimes={
                      "shakespeare": Regime("shakespeare", "text", 20_000, 30, SMOKE, val_windows=16),
                      # One pass over 12 KB of stdlib source at per-group batch 4 (the quick
                      # regimes' code path, tiny): the goal's pair; `--arms` runs the others.
                      "onepass-b4": replace(onepass(4, 10, ("sync", "codistill"), seeds=1, max_bytes=12_000,
                                                    val_windows=16, val_fraction=0.05),
                                            lr=((2, 4e-3), (4, 5.6e-3), (8, 8e-3))),
                  }),
    # A quarter-size model on 30 KB: every regime in minutes per arm.
    "quick": Mode("quick", ModelSize(64, 4, 256), ModelSize(64, 2, 128), seq_len=128, micro_batch=16,
                  eval_interval=25, stale_interval=50, run_timeout_s=1800, regimes={
                      "shakespeare": Regime("shakespeare", "text", 30_000, 300, FULL_MAIN + SIDE,
                                            val_windows=32, val_fraction=0.15, stop=StopRule()),
                      "compression": Regime("compression", "text", 30_000, 200, COMPRESSION,
                                            val_windows=32, val_fraction=0.15),
                      "token": Regime("token", "mixed", 400_000, 80, TOKEN, val_windows=64),
                      "stdlib": Regime("stdlib", "stdlib", 30_000, 300, FULL_MAIN[:3] + ("diloco-h50",),
                                       val_windows=32, val_fraction=0.15, stop=StopRule()),
                      "hetero": Regime("hetero", "text", 30_000, 300, HETERO, val_windows=32,
                                       val_fraction=0.15, stop=StopRule()),
                      # One pass over the 12 MB corpus: 1466, 733 and 366 updates here.
                      "onepass-b64": onepass(64, 25),
                      "onepass-b128": onepass(128, 25),
                      "onepass-b32": onepass(32, 50),
                      # onepass-b128 at the tuned learning rates, with the attempts at closing the gap.
                      "onepass-b128-tuned": replace(
                          onepass(128, 25, ONEPASS + ("codistill-alpha0.5", "codistill-alpha0.25", "codistill-alpha0.1",
                                        "codistill-burnin")),
                          name="onepass-b128-tuned", lr=ONEPASS_LR_TUNED),
                  }),
    "full": Mode("full", BENCH, ModelSize(128, 2, 256), seq_len=128, micro_batch=16,
                 eval_interval=25, stale_interval=50, regimes={
                     "shakespeare": Regime("shakespeare", "text", 100_000, 1000, FULL_MAIN, seeds=2,
                                           stop=StopRule()),
                     "compression": Regime("compression", "text", 100_000, 500, COMPRESSION),
                     # 2.2 MB: 15.6k training windows of 128 tokens; 480 updates of 32 sequences
                     # (sync) or 2 x 16 (two groups) read 15.4k of them: one pass.
                     "token": Regime("token", "mixed", 2_230_788, 480, TOKEN, val_windows=128),
                     "stdlib": Regime("stdlib", "stdlib", 100_000, 1000, FULL_MAIN[:3] + ("diloco-h50",),
                                      seeds=2, stop=StopRule()),
                     # The shakespeare regime's data and budget: its sync and independent runs
                     # are reused.
                     "hetero": Regime("hetero", "text", 100_000, 1000, HETERO, stop=StopRule()),
                 }),
}


def regime_arms(regime: Regime, names: list[str] | None) -> list[Arm]:
    """The regime's arms, or the named subset (any known arm may be named)."""
    wanted = list(regime.arms) if not names else names
    unknown = [n for n in wanted if n not in ARMS]
    if unknown:
        raise SystemExit(f"quality: unknown arms {unknown}; valid: {', '.join(ARMS)}")
    return [ARMS[n] for n in wanted]


def seeds_of(arm: Arm, regime: Regime) -> list[int]:
    """Seeds are 1000 apart: codistill group g initializes with seed + g, so neighbouring seeds
    would share a model."""
    seeded = GOAL_ARMS if regime.seeded is None else regime.seeded
    n = regime.seeds if arm.name in seeded else regime.side_seeds
    return [BASE_SEED + 1000 * i for i in range(n)]


def with_seeds(regime: Regime, seeds: int | None) -> Regime:
    return regime if not seeds else replace(regime, seeds=seeds, side_seeds=seeds)


def arm_steps(arm: Arm, regime: Regime, steps: int | None = None) -> int:
    return (steps or regime.steps) // arm.batch_scale


def rank_batch(arm: Arm, mode: Mode, regime: Regime) -> int:
    """Sequences per rank per update."""
    return (regime.micro_batch or mode.micro_batch) * arm.batch_scale // arm.batch_div


def model_batch(arm: Arm, mode: Mode, regime: Regime) -> int:
    """Sequences per model per update: sync's global batch, a group's or worker's batch."""
    return rank_batch(arm, mode, regime) * (1 if arm.codistill or arm.diloco else NPROC)


def lr_of(arm: Arm, mode: Mode, regime: Regime) -> float:
    """The regime's rate for the arm's batch (an arm's own `optim.lr` set wins)."""
    if not regime.lr:
        return 3e-3
    table, batch = dict(regime.lr), model_batch(arm, mode, regime)
    if batch not in table:
        raise SystemExit(f"quality: {regime.name}/{arm.name}: no learning rate for batch {batch} in {sorted(table)}")
    return table[batch]


def one_pass_steps(regime: Regime, mode: Mode, train_windows: int) -> Regime:
    """`regime` with steps = the updates of sync at 2b that one pass over `train_windows` holds
    (regimes with steps 0)."""
    if regime.steps:
        return regime
    return replace(regime, steps=train_windows // (NPROC * (regime.micro_batch or mode.micro_batch)))


def arm_overrides(arm: Arm, mode: Mode, regime: Regime, seed: int, files: list[str],
                  steps: int | None = None) -> list[str]:
    """The one place an arm (in its regime and mode) becomes `codistill-ds train --set` overrides;
    DiLoCo workers and the offline student read the same list (plain.py)."""
    codistill = arm.codistill or arm.diloco > 0  # DiLoCo workers: two groups' data shards
    ranks_per_model = 1 if codistill else NPROC
    batch = rank_batch(arm, mode, regime)
    # Each rank scores val_batches x micro_batch windows, the ranks of a model taking turns, so
    # this count makes sync (2 ranks) and codistill (1 rank per model) score the same windows.
    val_batches = regime.val_windows // (ranks_per_model * batch)
    size = mode.small if arm.small else mode.model
    sets: dict[str, object] = {
        "seed": seed,
        "data.train_files": files, "data.max_bytes": regime.max_bytes,
        "data.seq_len": mode.seq_len, "data.micro_batch_size": batch,
        "data.val_fraction": regime.val_fraction, "data.val_batches": val_batches,
        "model.arch": "llama", "model.hidden_size": size.hidden_size,
        "model.num_layers": size.num_layers, "model.num_heads": size.num_heads,
        "model.intermediate_size": size.intermediate_size, "model.max_seq_len": mode.seq_len,
        "optim.lr": lr_of(arm, mode, regime), "optim.min_lr": 3e-4, "optim.schedule": "cosine",
        "optim.warmup_steps": mode.warmup_steps,
        "train.steps": arm_steps(arm, regime, steps),
        "train.eval_interval": regime.eval_interval or mode.eval_interval,
        "train.log_interval": mode.log_interval,
        "backend.name": "deepspeed",
        # Weight exchange sends ZeRO-3 shards; ZeRO-1 is the cheapest engine for the rest.
        "backend.ds_config": f"ds_configs/zero{3 if arm.weights else 1}.json",
        "backend.precision": "fp32",
        "codistill.enabled": arm.codistill, "codistill.groups": NPROC if codistill else 1,
        "codistill.mode": "weights" if arm.weights else "logits",
        "codistill.exchange_batch": "shared" if arm.weights else "train",
        "codistill.alpha": arm.alpha,
        "codistill.interval": mode.stale_interval if arm.sparse else 1,
        # Stale weights: the first copy (step 0) is the peer's random init, so distill from the
        # second exchange on (Anil et al.'s burn-in); fresh logits need no burn-in.
        "codistill.burn_in": mode.stale_interval if arm.weights and arm.sparse else 0,
        "codistill.ramp": 0, "codistill.temperature": 1.0,
        "codistill.loss": "kl", "codistill.topk": 32, "codistill.dtype": "bf16",
        **(ADJUSTED_REG if arm.adjusted else BASELINE_REG),
        **dict(regime.sets),
        **dict(arm.sets),
    }
    if arm.weights and not arm.sparse:  # an explicit interval: burn in over the first copy
        sets["codistill.burn_in"] = int(dict(arm.sets).get("codistill.interval", 1))
    return [f"{key}={json.dumps(value)}" for key, value in sets.items()]  # JSON is YAML


def check_windows(mode: Mode, regime: Regime, arms: list[Arm], corpus_bytes: int,
                  split: tuple[int, int] | None = None) -> None:
    """Fail before training if the held-out tail cannot hold `val_windows` sequences, or (without
    a stop rule: one pass) if an arm would read a training sequence twice. `split`: the exact
    (training, held-out) windows where known, else estimated from the size."""
    size = corpus_bytes if regime.max_bytes is None else min(corpus_bytes, regime.max_bytes)
    held_out = (int(size * regime.val_fraction) - 1) // mode.seq_len
    train = (size - int(size * regime.val_fraction) - 1) // mode.seq_len
    if split is not None:
        train, held_out = split
    for arm in arms:
        step = NPROC * rank_batch(arm, mode, regime)
        if regime.val_windows % step or regime.val_windows > held_out:
            raise SystemExit(f"quality: {regime.name}/{arm.name}: val_windows={regime.val_windows} must "
                             f"be a multiple of {step} and <= the {held_out} held-out windows")
        read = arm_steps(arm, regime) * step
        if regime.stop is None and regime.corpus in ("mixed", "stdlib") and read > train:
            raise SystemExit(f"quality: {regime.name}/{arm.name}: {read} sequences read, but the "
                             f"training split has {train}: the arm would repeat data")


def arm_settings(arm: Arm, sets: list[str]) -> dict:
    """What identifies a run: a rerun with equal settings reuses the finished run."""
    return {"arm": arm.name, "diloco": arm.diloco, "sets": sets}

"""Rank program: a plain single-group run (no mpu, no mesh slicing, no codistillation code) that
trains what group g of a codistillation job trains: same seed, same data shard, same schedules.
DeepSpeed or FSDP2 over the whole (2-rank) world, as the config's backend.name says.
Args: OUT CONFIG GROUPS [overrides...], or several runs one after another on the same ranks
(`@NAME [overrides...]`..., tests/workers/runs.py: e.g. one per backend), each writing
under OUT/NAME. Writes per-step losses for each group g in turn."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")

import deepspeed

from codistill_ds.backends.base import decay_param_groups
from codistill_ds.backends.deepspeed import build_ds_config
from codistill_ds.backends.model import build_model
from codistill_ds.config import load_config
from codistill_ds.data.corpus import build_corpus
from codistill_ds.data.streams import TrainStream
from codistill_ds.distributed.env import exit_process, shutdown, skip_deepspeed_shm_op
from codistill_ds.schedules import lr_at
from runs import split_runs


class PlainFSDP:
    """fully_shard over the default 1-D world mesh, manual accumulation and clipping."""

    def __init__(self, model, opt, cfg):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
            fully_shard(block, mesh=mesh)
        self.model, self.opt, self.cfg, self.micro = fully_shard(model, mesh=mesh), opt, cfg, 0

    def __call__(self, **kw):
        return self.model(**kw)

    def backward(self, loss):
        (loss / self.cfg.train.grad_accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.cfg.train.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.opt.step()
            self.opt.zero_grad()


def train_group(cfg, corpus, g: int, groups: int) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg.model, corpus.vocab_size, cfg.optim.dropout, cfg.seed + g)
    if cfg.backend.name == "fsdp":
        engine = PlainFSDP(model, None, cfg)
        model = engine.model
    opt = torch.optim.AdamW(decay_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.backend.name == "fsdp":
        engine.opt = opt
    else:
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                 config=build_ds_config(cfg, world, False))
    stream = TrainStream(corpus, cfg.seed, g, groups, rank, world, cfg.data.micro_batch_size,
                         cfg.train.grad_accum)
    o, losses = cfg.optim, []
    for step in range(cfg.train.steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, o.lr, o.warmup_steps, cfg.train.steps, o.schedule, o.min_lr)
        total = 0.0
        for m in range(cfg.train.grad_accum):
            batch = stream.micro_batch(step, m)
            logits = engine(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
            total += loss.item()
        t = torch.tensor([total / cfg.train.grad_accum], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def main() -> None:
    out, config, groups = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    skip_deepspeed_shm_op()  # as the library does: no JIT build of an op training never uses
    deepspeed.init_distributed(dist_backend="gloo")
    for run_out, sets in split_runs(out, sys.argv[4:]):
        cfg = load_config(config, sets)
        corpus = build_corpus(cfg.data)
        result = {str(g): train_group(cfg, corpus, g, groups) for g in range(groups)}
        (run_out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    shutdown()  # the same end as `codistill-ds train`: no gloo abort at interpreter exit
    exit_process(0)


if __name__ == "__main__":
    main()

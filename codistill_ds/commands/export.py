"""`codistill-ds export RUN_DIR --group g OUT`: one group's replica as a Hugging Face folder.

Each codistillation group trains its own model, so export picks one (`--group`). The weights
come from the group's newest complete checkpoint (or `--step N`), consolidated from the shards
on one process without a process group:

- DeepSpeed ZeRO (any stage): `deepspeed.utils.zero_to_fp32` rebuilds full fp32 tensors from
  the per-rank master-weight partitions;
- FSDP2: `torch.distributed.checkpoint` reads the sharded DCP files into full tensors
  (`no_dist=True`).

The module is rebuilt by `model.build_model` from RUN_DIR/config.yaml and the checkpoint's
vocabulary size, loaded strictly, and written with `save_pretrained`, so
`AutoModelForCausalLM.from_pretrained(OUT)` gives the training model's logits.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from codistill_ds.config import Config, load_config

if TYPE_CHECKING:  # torch and the checkpoint module are imported where used: the CLI registers
    import torch  # this command on every start, and `--help` or `--nproc` need neither


class ExportError(ValueError):
    """A run dir, group or step that cannot be exported; raised before anything is written."""


def find_checkpoint(run_dir: str, step: int | None) -> str:
    from codistill_ds.run.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir)
    if not found:
        raise ExportError(f"no complete checkpoint under {os.path.join(run_dir, 'checkpoints')}; "
                          "train with train.save_interval > 0 (the last step is always saved then)")
    if step is None:
        return found[-1][1]
    for s, path in found:
        if s == step:
            return path
    raise ExportError(f"--step {step}: no complete checkpoint of that step; have {[s for s, _ in found]}")


def consolidated_state_dict(group_dir: str, backend: str, template: dict[str, torch.Tensor]) -> dict:
    """Full fp32 tensors of one group's replica from its sharded engine checkpoint."""
    from codistill_ds.run.checkpoint import ENGINE_TAG

    if backend == "deepspeed":
        from codistill_ds.distributed import env as rankinfo

        rankinfo.prepare_accelerator_env()
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return dict(get_fp32_state_dict_from_zero_checkpoint(group_dir, tag=ENGINE_TAG))
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.empty_like(v) for k, v in template.items()}}
    dcp.load(state, checkpoint_id=os.path.join(group_dir, ENGINE_TAG), no_dist=True)
    return state["model"]


def _load_strict(model: torch.nn.Module, state: dict) -> None:
    """Every parameter must come from the checkpoint; a missing key may only be a tied alias."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ExportError(f"checkpoint holds tensors the model does not have: {unexpected[:5]}")
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in own if k in state}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied:
        raise ExportError(f"checkpoint lacks tensors of the model: {untied[:5]}")


def export(run_dir: str, group: int, out: str, step: int | None = None) -> str:
    """Write group `group`'s replica to `out`; returns the checkpoint it came from."""
    from codistill_ds.backends.model import build_model
    from codistill_ds.run.checkpoint import read_meta
    from codistill_ds.schedules import piecewise_constant

    path = find_checkpoint(run_dir, step)
    meta = read_meta(path)
    if not 0 <= group < meta["groups"]:
        raise ExportError(f"--group {group}: the run has groups 0..{meta['groups'] - 1}")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ExportError(f"{config_path} is missing; it is written by `codistill-ds train`")
    cfg: Config = load_config(config_path)
    dropout = piecewise_constant(meta["step"], cfg.optim.dropout, cfg.optim.dropout_milestones)
    model = build_model(cfg.model, meta["vocab_size"], dropout, seed=0)
    state = consolidated_state_dict(os.path.join(path, f"group_{group}"), meta["backend"],
                                    model.state_dict())
    _load_strict(model, state)
    model.save_pretrained(out)
    if cfg.data.tokenizer != "byte":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(cfg.data.tokenizer, local_files_only=True).save_pretrained(out)
    with open(os.path.join(out, "codistill_export.json"), "w") as f:
        json.dump({"run_dir": os.path.abspath(run_dir), "group": group, "step": meta["step"],
                   "checkpoint": os.path.abspath(path), "backend": meta["backend"],
                   "tokenizer": cfg.data.tokenizer}, f, indent=1)
    return path


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("out", help="output folder for AutoModelForCausalLM.from_pretrained")
    p.add_argument("--group", type=int, required=True, help="which codistillation group's replica")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    from codistill_ds.config import ConfigError

    try:
        path = export(args.run_dir, args.group, args.out, args.step)
    except (ExportError, ConfigError) as err:
        print(f"codistill-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"exported group {args.group} from {path} to {args.out}")
    return 0

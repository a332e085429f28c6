"""Per-group outputs of a codistilled Trainer: `output_dir/group{g}/` written by each group's leader.

A codistillation job trains K models, so everything a Trainer writes once per job is written
once per group, by the group's leader (group rank 0), into that group's own folder: the model
and tokenizer (`save_model`), `trainer_state.json` (`save_state`), `*_results.json`
(`save_metrics`) and checkpoints (`checkpoint-N/`, resumable per group). What stands in the way
in transformers 5.23 / DeepSpeed 0.19.8, and the fix for each:

- `TrainingArguments.should_save` is "global rank 0": `group_leader_saves` gives the
  arguments a subclass whose `should_save` is "my group's leader".
- `PreTrainedModel.save_pretrained` writes only where `torch.distributed.get_rank() == 0`
  (`should_save_on_this_rank`), whatever `is_main_process` says: `save_on_any_rank` lets the
  caller's `is_main_process` (the group leader's `should_save`) decide.
- ZeRO-3 consolidation for `save_model` (`_zero3_consolidated_16bit_state_dict`) gathers each
  layer over the parameter's own process group (the group, since the engine was built in-group)
  but copies it only where `dist.get_rank() == 0`: every group but group 0 would save nothing.
  `group_state_dict` gathers the same way and copies on the group's leader.
- `DeepSpeedEngine.save_checkpoint` writes the `latest` tag (which `load_checkpoint` reads to
  resume) only on global rank 0: `write_latest_tag` writes it in the other groups' checkpoints.
- A resume path is one command line for every rank: `group_checkpoint` maps
  `output_dir/checkpoint-N` (or another group's) to `output_dir/group{g}/checkpoint-N`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from codistill_ds.distributed.axes import ParallelDims

_GROUP_ARGUMENT_CLASSES: dict[type, type] = {}


def group_leader_saves(args: Any, dims: ParallelDims) -> None:
    """Make `args.should_save` true on my group's leader only (in place: the Trainer and the
    script share one arguments object). Pickles as the original class (`training_args.bin`)."""
    base = type(args)
    if getattr(base, "_codistill_base", None) is not None:
        base = base._codistill_base
    cls = _GROUP_ARGUMENT_CLASSES.get(base)
    if cls is None:
        def should_save(self) -> bool:
            return self._codistill_leader

        def reduce_ex(self, protocol: int):
            state = {k: v for k, v in self.__dict__.items() if k != "_codistill_leader"}
            return _rebuild, (base, state)

        cls = type(f"Group{base.__name__}", (base,), {
            "should_save": property(should_save, doc="True on my codistillation group's leader."),
            "__reduce_ex__": reduce_ex, "_codistill_base": base, "__module__": base.__module__})
        _GROUP_ARGUMENT_CLASSES[base] = cls
    args.__class__ = cls
    args._codistill_leader = dims.is_leader


def _rebuild(cls: type, state: dict) -> Any:
    """Unpickle arguments as their original class (no __post_init__: the state is complete)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


@contextmanager
def save_on_any_rank(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model.save_pretrained(..., is_main_process=...)` writes where told to."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank


def group_state_dict(module: torch.nn.Module, is_leader: bool) -> dict[str, torch.Tensor] | None:
    """The full weights of a ZeRO-3 module on my group's leader (None elsewhere); every rank of
    the group calls it. One module's parameters are gathered at a time (inside the parameters'
    own process group), so the leader never holds more than one layer gathered beyond the copy."""
    import deepspeed

    out: OrderedDict[str, torch.Tensor] | None = OrderedDict() if is_leader else None
    first_key: dict[int, str] = {}

    def visit(m: torch.nn.Module, prefix: str) -> None:
        params = [p for p in m.parameters(recurse=False) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if out is not None:
                for name, p in m.named_parameters(recurse=False):
                    key, ident = prefix + name, getattr(p, "ds_id", id(p))
                    if ident in first_key:  # tied weights stay one tensor (save_pretrained dedups)
                        out[key] = out[first_key[ident]]
                    else:
                        out[key], first_key[ident] = p.detach().to("cpu", copy=True), key
                for name, b in m.named_buffers(recurse=False):
                    if b is not None and name not in m._non_persistent_buffers_set:
                        out[prefix + name] = b.detach().to("cpu", copy=True)
        for name, child in m.named_children():
            visit(child, f"{prefix}{name}.")

    visit(module, "")
    return out


def write_latest_tag(checkpoint_dir: str, tag: str) -> None:
    """The `latest` file DeepSpeed's `load_checkpoint` reads (written atomically)."""
    path = os.path.join(checkpoint_dir, "latest")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, path)


def group_checkpoint(path: Any, group: int) -> Any:
    """`.../checkpoint-N` or `.../group{h}/checkpoint-N` -> `.../group{g}/checkpoint-N` when that
    folder exists; anything else (True, None, a path already in my group) is returned as given."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    path = os.path.normpath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.basename(parent) == f"group{group}":
        return path
    if re.fullmatch(r"group\d+", os.path.basename(parent)):
        parent = os.path.dirname(parent)
    mine = os.path.join(parent, f"group{group}", name)
    return mine if os.path.isdir(mine) else path

"""Start every group from a local Hugging Face checkpoint (safetensors), each rank reading only what it keeps.

Why not `from_pretrained`: under ZeRO-3 it loads the partitioned weights on *global* rank 0 only
(docs/design.md, "GPU notes"), which leaves every group but group 0 without them, and without
ZeRO-3 it puts the whole model on every rank, which is what sharding exists to avoid. Here the
replica is built the way the backend builds a random one (a skeleton whose parameters take no
memory, or partitioned over my group under `deepspeed.zero.Init`) and each rank then reads, one
parameter at a time, exactly the elements it keeps, from the safetensors files:

- FSDP2 and FSDP2 + TP (`load_shards`): the box [offset, offset + local shape) of each DTensor
  (`compute_local_shape_and_global_offset`, what DCP writes each shard as), read with
  `safe_open(...).get_slice(name)[box]`: TP's column/row blocks and FSDP's rows of them;
- ZeRO-3 (`load_zero3`): the flat range [r*n, (r+1)*n) of each parameter (ZeRO splits the
  flattened tensor into S slices of n), read as the rows that cover it;
- ZeRO-1/2, AutoTP and one process (`load_whole`): every rank keeps the whole replica anyway.

Each read opens the file, copies its piece out of safetensors' memory map (whose tensors are
views of the file, paged in lazily: kept as parameters they would tie the model to the file)
and drops the map, so the file pages it touched leave the resident set at once: a rank's peak
is its shards plus one piece being read, never the whole model (tests/dist/test_pretrained.py
measures it). The values are the file's, cast to the parameter's dtype (fp32 master weights),
so every group starts from the same weights, equal bit for bit to
`AutoModelForCausalLM.from_pretrained` of the folder. Names are the model's parameter names as
`save_pretrained` of this Transformers version writes them (a tied `lm_head` is absent from the
file and tied again here).

Bad folders fail at start, before any process group, with one line naming the field
(`ConfigError`): weights required but absent, PyTorch `.bin` files only, a tensor the model needs
missing, a shape the config does not build, a tokenizer with more ids than the embedding has rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from codistill_ds.config import ConfigError, ModelConfig

FIELD = "model.name_or_path"
INDEX = "model.safetensors.index.json"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---- the folder -------------------------------------------------------------------------------------

def weights_folder(cfg: ModelConfig) -> str | None:
    """The folder whose weights start every group, or None for a random initialization.

    `model.weights`: "auto" loads them when `name_or_path` is a folder with safetensors weights,
    "pretrained" requires them, "random" ignores them (the config alone defines the model)."""
    path, mode = cfg.name_or_path, cfg.weights
    if mode == "random" or path is None:
        if mode == "pretrained":
            raise ConfigError("model.weights", "'pretrained' needs model.name_or_path: a local Hugging Face "
                                               "folder with safetensors weights")
        return None
    found = _safetensors_files(path) if os.path.isdir(path) else []
    if found:
        return path
    bins = os.path.isdir(path) and any(f.endswith((".bin", ".pt")) for f in os.listdir(path))
    if bins:
        raise ConfigError(FIELD, f"{path} holds PyTorch .bin weights only; save them as safetensors "
                                 "(save_pretrained(..., safe_serialization=True)), or set model.weights random")
    if mode == "pretrained":
        raise ConfigError(FIELD, f"{path} has no weights (no *.safetensors, no {INDEX}); model.weights "
                                 "'pretrained' needs them (or set model.weights random to train from the config)")
    return None


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


class SafetensorsFolder:
    """Where each tensor of a safetensors checkpoint lives, from the files' headers only (no
    tensor data is read here), and reads of parts of one tensor."""

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open

        self.folder = folder
        self.files: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in _safetensors_files(folder):
            if not os.path.isfile(path):
                raise ConfigError(FIELD, f"{INDEX} in {folder} names {os.path.basename(path)}, which is missing")
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    piece = f.get_slice(name)
                    self.files[name] = path
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = piece.get_dtype()

    @contextmanager
    def _slice(self, name: str) -> Iterator[Any]:
        """The tensor's lazy slice; the file is closed (its mapping dropped) on exit."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            yield f.get_slice(name)

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor."""
        return self.read_box(name, (0,) * len(self.shapes[name]), self.shapes[name])

    def read_box(self, name: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """Elements [offset, offset + shape) of the tensor: only those rows (and columns) are read,
        into memory of its own (safetensors hands out views of the file's memory map, which
        would keep the file mapped, paged in only when first touched)."""
        with self._slice(name) as piece:
            view = piece[...] if not shape else piece[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            return view.clone(memory_format=torch.contiguous_format)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, read as the dim-0 rows that cover them."""
        shape = self.shapes[name]
        row = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        first, last = start // row, -(-stop // row)
        with self._slice(name) as piece:
            rows = piece[first:last] if shape else piece[...]
        return rows.reshape(-1)[start - first * row: stop - first * row].clone()


def check_checkpoint(skeleton: nn.Module, folder: str, clean: Callable[[str], str] = lambda n: n) -> SafetensorsFolder:
    """The folder's index, after checking that it holds every parameter of `skeleton` (a meta
    build of the model the config defines) with the same shape: raises `ConfigError` naming the
    first problems otherwise. Pure and cheap (headers only): run it on every rank at start."""
    files = SafetensorsFolder(folder)
    missing, wrong = [], []
    for key, p in skeleton.named_parameters():
        name = clean(key)
        if name not in files.shapes:
            missing.append(name)
        elif files.shapes[name] != tuple(getattr(p, "ds_shape", p.shape)):
            shape = list(getattr(p, "ds_shape", p.shape))
            wrong.append(f"{name} is {list(files.shapes[name])} in the file, the config builds {shape}")
        elif files.dtypes[name] not in _TORCH_DTYPES:
            wrong.append(f"{name} has dtype {files.dtypes[name]} (expected a float dtype)")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(FIELD, f"{folder} lacks {len(missing)} tensor(s) the model needs: "
                                 f"{', '.join(missing[:3])}{more} (a checkpoint of another architecture?)")
    if wrong:
        raise ConfigError(FIELD, f"{folder} does not fit its config: {'; '.join(wrong[:2])}")
    return files


def checkpoint_vocab_size(folder: str, tokenizer_vocab: int) -> int:
    """The vocabulary of a run started from `folder`: its config's `vocab_size` (the embedding's
    rows; it may exceed the tokenizer's ids, as padded vocabularies do). A tokenizer with more
    ids than that would index past the embedding: refused, naming `data.tokenizer`."""
    from transformers import AutoConfig

    vocab = getattr(AutoConfig.from_pretrained(folder, local_files_only=True), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ConfigError(FIELD, f"the config in {folder} has no vocab_size")
    if tokenizer_vocab > vocab:
        raise ConfigError("data.tokenizer", f"the tokenizer has {tokenizer_vocab} ids but the model in {folder} "
                                            f"has a vocabulary of {vocab} (embedding rows): use the model's own "
                                            "tokenizer (data.tokenizer auto)")
    return vocab


# ---- building and filling ---------------------------------------------------------------------------

@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters go to the meta device as they are registered; buffers (rotary tables) are
    computed as usual. The parameters' constructors run under `no_init_weights`, so their
    `torch.empty` storage is never touched before it is dropped."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton_with_buffers(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with every parameter on the meta device and real buffers: the shape of the
    model to shard, costing no parameter memory and no random draws."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), _parameters_on_meta():
        model = build()
    model.tie_weights()  # `init_weights`, skipped above, is where Transformers ties lm_head
    return model


def _load_buffers(model: nn.Module, files: SafetensorsFolder, clean: Callable[[str], str]) -> None:
    """Persistent buffers the checkpoint holds (Llama has none: its rotary table is computed)."""
    for key, buf in model.named_buffers():
        if clean(key) in files.shapes:
            buf.data.copy_(files.read(clean(key)).to(buf.dtype))


def load_whole(build: Callable[[], nn.Module], folder: str) -> nn.Module:
    """The whole model on this process with the folder's weights (ZeRO-1/2, AutoTP, one process:
    every rank holds a whole replica there anyway)."""
    model = skeleton_with_buffers(build)
    files = check_checkpoint(model, folder)
    state = {name: files.read(name).to(p.dtype) for name, p in model.named_parameters()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _load_buffers(model, files, lambda n: n)
    return model


def load_zero3(build: Callable[[], nn.Module], folder: str, group: Any, ds_config: dict | None = None,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """`build()` partitioned over `group` under zero.Init without random draws, then each rank's
    ZeRO-3 partition of every parameter read from the folder (the flat range ZeRO gives rank r
    of S: [r*n, min((r+1)*n, numel)), n = ceil(numel / S); the padding is zeroed), then cast to
    `dtype` like `materialize.build_zero3`. No communication: every rank reads its own slice."""
    import torch.distributed as dist
    from transformers.initialization import no_init_weights

    from codistill_ds.backends.materialize import cast_partitions, group_init

    with no_init_weights(), group_init(group, ds_config) as built:
        model = build()
        model.tie_weights()
    files = check_checkpoint(model, folder)
    for name, p in model.named_parameters():
        part = p.ds_tensor.data
        n, rank = part.numel(), dist.get_rank(group=p.ds_process_group)
        start, stop = rank * n, min((rank + 1) * n, p.ds_numel)
        part.zero_()
        if start < stop:
            part[: stop - start].copy_(files.read_flat(name, start, stop))
    _load_buffers(model, files, lambda n: n)
    cast_partitions(built, dtype)
    return model


def load_shards(model: nn.Module, folder: str, device: torch.device) -> nn.Module:
    """Fill a TP/FSDP2-sharded skeleton (`skeleton_with_buffers`, then parallelized and
    `fully_shard`ed) with the folder's weights: each DTensor parameter gets the box of the file
    tensor it holds locally, read alone; plain parameters are read whole."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from codistill_ds.backends.replica import clean_name, materialize_pieces

    files = check_checkpoint(model, folder, clean_name)

    def piece(name: str, p: torch.Tensor) -> torch.Tensor:
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            return files.read_box(name, tuple(offset), tuple(shape))
        return files.read(name)

    materialize_pieces(model, piece, device)
    _load_buffers(model, files, clean_name)
    return model


class Pretrained:
    """The `weights` of `replica.build_parallel_replica`: a skeleton with real buffers, filled
    from `folder` shard by shard."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def skeleton(self, build: Callable[[], nn.Module]) -> nn.Module:
        return skeleton_with_buffers(build)

    def fill(self, model: nn.Module, device: torch.device) -> nn.Module:
        return load_shards(model, self.folder, device)

"""One process, torch's fake process group: count the collectives one rank issues during one
forward + backward of a real tensor-parallel / FSDP2 / HSDP Llama, for `codistill-ds plan`'s
traffic formulas (tests/unit/test_plan_group.py compares them; plan/traffic.py states them).

The fake backend returns at once without moving data, so the numbers that come out are wrong but
the collectives called, their sizes and dtypes are exactly what the real job calls: the same
`apply_tensor_parallel`, `apply_activation_checkpointing` and `apply_fsdp` the FSDP backend runs.
Not recorded: collectives DTensor issues inside its own op dispatch (loss_parallel's per-token max
and sums, 3 all-reduces of b L floats: torch's CommDebugMode counts them), which the plan leaves
out as well.

    python tests/workers/plan_comm_count.py '[{"R": 1, "D": 2, "T": 2, "layers": 2, "ac": "full", "b": 3, "L": 8}]'

prints a JSON list, one object per spec (each on a fresh fake world): per phase ("forward", "backward"; the loss is in "backward") a list of
[op, bytes of the collective's message, dtype] (all-reduce: its tensor; all-gather: the gathered
output; reduce-scatter: the input, = output x group size), plus the model's sizes.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB, HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 64, 32, 4, 2, 64


class Collectives(TorchDispatchMode):
    """Records every c10d collective dispatched (functional ones from DTensor, in-place ones from
    FSDP2), with the size of the message the ring formulas take."""

    def __init__(self, sizes: dict) -> None:
        super().__init__()
        self.calls: list[list] = []
        self.sizes = sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        first = args[0] if args else None
        if isinstance(first, (list, tuple)):
            first = first[0] if first else None
        if isinstance(first, (list, tuple)):
            first = first[0] if first else None
        if "c10d" in name and isinstance(first, torch.Tensor) and not any(w in name for w in ("wait", "wrap")):
            nbytes = first.numel() * first.element_size()
            if "reduce_scatter" in name:
                nbytes *= self.sizes["D"]  # args[0] is the output shard; the formula takes the input
            self.calls.append([name.split(".")[1] if name.startswith("c10d.") else name, nbytes, str(first.dtype)])
        return func(*args, **(kwargs or {}))


def main(spec: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    from codistill_ds.backends.activation_checkpointing import (
        apply_activation_checkpointing,
    )
    from codistill_ds.backends.sharding import apply_fsdp, data_parallel_mesh
    from codistill_ds.backends.tensor_parallel import (
        apply_tensor_parallel,
        cross_entropy,
        loss_parallel_context,
    )

    R, D, T = spec["R"], spec["D"], spec["T"]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=R * D * T)
    mesh = init_device_mesh("cpu", (R, D, T), mesh_dim_names=("replicate", "dp_shard", "tp"))
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=spec["layers"], num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    if T > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, spec["ac"])
    apply_fsdp(model, data_parallel_mesh(mesh), param_dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (spec["b"], spec["L"]))
    with Collectives({"D": D}) as seen:
        logits = model(input_ids=ids, use_cache=False).logits
        forward = len(seen.calls)
        with loss_parallel_context(logits):
            cross_entropy(logits.float(), ids).backward()
    dist.destroy_process_group()
    return {"params": params, "hidden": HIDDEN, "vocab": VOCAB, "forward": seen.calls[:forward],
            "backward": seen.calls[forward:]}


if __name__ == "__main__":
    print(json.dumps([main(spec) for spec in json.loads(sys.argv[1])]))

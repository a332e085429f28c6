"""Activation checkpointing per transformer block: "none" | "full" | "selective".

Applied after tensor parallelism and before `fully_shard` (torchtitan's order): the wrapper sits
around each decoder layer, and FSDP2 then shards the wrapped layer as a unit, so the recomputed
forward re-gathers that layer's parameters in backward like the first forward did.

- "full": every decoder layer is wrapped with torch's non-reentrant `checkpoint_wrapper`; only
  each layer's input is kept, the rest of the layer is recomputed during backward.
- "selective": layer-level selective checkpointing, every `every`-th layer (torchtitan's
  `selective_ac_option = "2"` by default: layers 1, 3, 5, ...): about half the activation memory
  for about half the recompute of "full". Chosen over torchtitan's op-level policy (save the
  outputs of matmuls and attention, recompute the rest) because that policy is a list of aten ops
  that depends on the device's attention kernel (CUDA flash/efficient attention vs the CPU's
  `_scaled_dot_product_flash_attention_for_cpu`) and on the DTensor dispatch of TP ops; the
  layer-level choice is exact and device-independent, which is what the tests here can prove.

Names: the wrapper inserts `_checkpoint_wrapped_module.` into parameter names under the root;
state dicts (and DCP, through torch's state-dict utilities) strip it, so checkpoints and exports
do not depend on the mode. `tensor_parallel.clean_name` strips it where this library maps names.

DeepSpeed and Accelerate-prepared models take `checkpoint_layers` instead: the same choice of
layers, through Transformers' own per-layer switch (`GradientCheckpointingLayer`: the layer's
`forward`, not its `__call__`, runs under torch's non-reentrant checkpoint). No wrapper, so the
parameter names DeepSpeed writes into its checkpoints (and `zero_to_fp32` hands to `export`)
stay the model's, and ZeRO-3's per-module hooks, outside the checkpointed `forward`, gather
each submodule's parameters again when the backward recomputes it.
"""

from __future__ import annotations

from torch import nn

MODES = ("none", "full", "selective")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of repeated transformer blocks (Llama's `model.layers`, GPT-2's `transformer.h`):
    the first `ModuleList` whose members are all Transformers checkpointable layers, or
    checkpoint wrappers around them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def block(m: nn.Module) -> bool:
        return isinstance(getattr(m, "_checkpoint_wrapped_module", m), GradientCheckpointingLayer)

    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(block(layer) for layer in m):
            return m
    raise ValueError(f"{type(model).__name__} has no list of transformer blocks to checkpoint")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Wrap the decoder layers of `model` (in place, in their layer list) for `mode`; returns
    `model`. `every` is the selective period (wrap layers i with (i + 1) % every == 0)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return model
    if mode == "selective" and every < 1:
        raise ValueError(f"selective activation checkpointing needs every >= 1, got {every}")
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, CheckpointWrapper):
            continue
        if mode == "full" or (i + 1) % every == 0:
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                           preserve_rng_state=True)
    return model


def checkpoint_layers(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Turn on Transformers' checkpointing for the decoder layers `mode` chooses (the layers
    `apply_activation_checkpointing` would wrap), in place, without renaming any parameter;
    returns `model`. Works on a model already built under ZeRO-3 or prepared by Accelerate."""
    import functools

    from torch.utils.checkpoint import checkpoint

    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode must be one of {MODES}, got {mode!r}")
    if mode == "selective" and every < 1:
        raise ValueError(f"selective activation checkpointing needs every >= 1, got {every}")
    layers = decoder_layers(model)
    func = functools.partial(checkpoint, use_reentrant=False)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = mode == "full" or (mode == "selective" and (i + 1) % every == 0)
        layer._gradient_checkpointing_func = func
    return model


def checkpointed_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers that are wrapped or switched on (for tests and logs)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
    )

    return [i for i, layer in enumerate(decoder_layers(model))
            if isinstance(layer, CheckpointWrapper) or getattr(layer, "gradient_checkpointing", False) is True]

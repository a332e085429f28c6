"""Build the replica each group trains: a Hugging Face causal LM from a config, randomly initialized
or (`ModelRecipe.pretrained`) started from a local folder's weights (backends/pretrained.py).

Nothing is downloaded: either a local config (directory or JSON file) or inline sizes for a tiny
Llama or GPT-2. Using the Transformers classes (not a home-made model) keeps `export` a plain
`save_pretrained` and lets the Trainer integration train the very same module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codistill_ds.config import ModelConfig


def build_hf_config(cfg: ModelConfig, vocab_size: int, dropout: float):
    """The `transformers` config for this run; dropout is set here and later by the schedule."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if cfg.name_or_path:
        hf = AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=True)
        hf.vocab_size = vocab_size
        return hf
    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=cfg.max_seq_len,
            attention_dropout=dropout,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=cfg.max_seq_len,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=None,
        eos_token_id=None,
    )


def build_model(cfg: ModelConfig, vocab_size: int, dropout: float, seed: int) -> torch.nn.Module:
    """Random init under `seed`, so a group's replica is reproducible from (seed, group).

    Called as is, it builds the whole model on this process (the reference the sharded builds
    of `materialize.py` equal); called inside `materialize.group_init` or under
    `torch.device("meta")`, the same code builds a partitioned replica or a bare skeleton."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_config(cfg, vocab_size, dropout)
    hf._attn_implementation = "eager" if cfg.arch == "gpt2" and not cfg.name_or_path else "sdpa"
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # fp32 master weights whatever the folder's config says (a bf16 checkpoint's config
        # carries dtype=bfloat16); backends choose the compute precision themselves
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    return model


@dataclass(frozen=True)
class ModelRecipe:
    """How to build one group's replica; backends decide where the weights are materialized
    (whole, partitioned over the group, or nowhere for a skeleton)."""

    cfg: ModelConfig
    vocab_size: int
    dropout: float
    seed: int
    pretrained: str | None = None
    """A safetensors folder every group starts from (`pretrained.weights_folder`), or None:
    random weights drawn under `seed`."""

    def build(self) -> torch.nn.Module:
        """The architecture, randomly initialized under `seed` (what a sharded build fills)."""
        return build_model(self.cfg, self.vocab_size, self.dropout, self.seed)

    def whole(self) -> torch.nn.Module:
        """The whole replica on this process: the folder's weights, or `build()`."""
        if self.pretrained is None:
            return self.build()
        from codistill_ds.backends.pretrained import load_whole

        return load_whole(self.build, self.pretrained)

    def skeleton(self) -> torch.nn.Module:
        """The architecture on the meta device: shapes only, no memory, no random draws
        (Transformers skips weight init there)."""
        with torch.device("meta"):
            return self.build()

    def num_parameters(self) -> int:
        return count_parameters(self.skeleton())


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Apply the dropout schedule in place: both `nn.Dropout` modules and Llama's attention rate.

    Regularization is part of codistillation (Sodhani et al.): the schedule changes it mid-run."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = p


def count_parameters(model: torch.nn.Module) -> int:
    """Full parameter count, also under ZeRO-3 where local tensors are empty placeholders."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

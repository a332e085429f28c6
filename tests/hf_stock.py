"""A stock causal-LM Trainer script, and the README's codistillation diff applied to it.

`STOCK_SCRIPT` is written here from scratch in the shape of transformers'
examples/pytorch/language-modeling/run_clm.py (HfArgumentParser over ModelArguments,
DataTrainingArguments and TrainingArguments; a tokenizer loaded from disk; `from_pretrained` or
`from_config` of a model type with `--config_overrides`; `load_dataset("text")`, tokenize,
group into blocks; `Trainer(...).train()`, `save_model`, `save_metrics`, `save_state`,
`evaluate`). It knows nothing of codistillation: `apply_readme_diff` inserts exactly the lines
of the README's ```diff block.
"""

from __future__ import annotations

import re
from pathlib import Path

from launch import REPO

STOCK_SCRIPT = '''\
"""Fine-tune or train from scratch a causal language model on a text file (run_clm.py style)."""

import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Checkpoint to start from."})
    model_type: Optional[str] = field(default=None, metadata={"help": "Model type when training from scratch."})
    config_overrides: Optional[str] = field(default=None, metadata={"help": "e.g. n_embd=10,resid_pdrop=0.2"})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer name or path."})


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "A text file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A text file."})
    block_size: Optional[int] = field(default=None, metadata={"help": "Tokens per training sequence."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the train set."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout)])
    logger.setLevel(training_args.get_process_log_level())
    set_seed(training_args.seed)

    raw_datasets = load_dataset("text", data_files={"train": data_args.train_file,
                                                    "validation": data_args.validation_file})

    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    else:
        config = AutoConfig.for_model(model_args.model_type)
        if model_args.config_overrides is not None:
            logger.info(f"Overriding config: {model_args.config_overrides}")
            config.update_from_string(model_args.config_overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)

    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
        )
    else:
        model = AutoModelForCausalLM.from_config(config)
        n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
        logger.info(f"Training new model from scratch - Total size={n_params / 2**20:.2f}M params")

    # We resize the embeddings only when necessary to avoid index errors.
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))

    column_names = list(raw_datasets["train"].features)
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names)

    block_size = data_args.block_size or min(1024, config.max_position_embeddings)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(group_texts, batched=True)

    train_dataset = lm_datasets["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    eval_dataset = lm_datasets["validation"]

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(eval_dataset)
    try:
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
    except OverflowError:
        metrics["perplexity"] = float("inf")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
'''


def readme_diff() -> list[str]:
    """The first ```diff block of the README's Trainer section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Codistillation in your Hugging Face Trainer script"):]
    match = re.search(r"```diff\n(.*?)```", section, re.DOTALL)
    assert match, "README's Trainer section has no ```diff block"
    return match.group(1).splitlines()


def apply_readme_diff(script: str) -> tuple[str, int]:
    """Apply each hunk (context ' ', removed '-', added '+') where its old lines occur exactly once;
    returns the new script and the number of added or changed lines ('+' lines)."""
    lines = script.splitlines()
    hunks: list[list[str]] = []
    for line in readme_diff():
        if line.startswith("@@"):
            hunks.append([])
        elif line:
            hunks[-1].append(line)
    for hunk in hunks:
        old = [ln[1:] for ln in hunk if ln[0] in " -"]
        new = [ln[1:] for ln in hunk if ln[0] in " +"]
        at = [i for i in range(len(lines) - len(old) + 1) if lines[i:i + len(old)] == old]
        assert len(at) == 1, f"hunk {hunk} matches the stock script {len(at)} times"
        lines[at[0]:at[0] + len(old)] = new
    plus = sum(ln.startswith("+") for hunk in hunks for ln in hunk)
    return "\n".join(lines) + "\n", plus


def write_scripts(tmp: Path) -> tuple[Path, Path, int]:
    """Writes stock.py and codistill.py (the README's lines applied); returns both and the count."""
    stock, codistill = tmp / "stock.py", tmp / "run_clm_codistill.py"
    stock.write_text(STOCK_SCRIPT)
    text, count = apply_readme_diff(STOCK_SCRIPT)
    codistill.write_text(text)
    return stock, codistill, count


CONFIG_OVERRIDES = ("hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,"
                    "num_key_value_heads=2,head_dim=16,vocab_size=256,max_position_embeddings=64")
"""A 2-layer Llama over the 256-symbol byte-level tokenizer (about 37K parameters)."""


def byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer built locally (no merges: one token per byte), saved like a hub one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def text_files(tmp: Path, train_bytes: int = 60_000, val_bytes: int = 3_000) -> tuple[Path, Path]:
    """Real text, nothing downloaded: the standard library's `json` and `email` sources."""
    import email
    import json

    text = "".join(p.read_text() for pkg in (json, email) for p in sorted(Path(pkg.__file__).parent.glob("*.py")))
    train, val = tmp / "train.txt", tmp / "validation.txt"
    train.write_text(text[:train_bytes])
    val.write_text(text[train_bytes:train_bytes + val_bytes])
    return train, val


def reference_model(seed: int):
    """The unsharded construction the stock script does with this seed (no DeepSpeed, one process)."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    config = AutoConfig.for_model("llama")
    config.update_from_string(CONFIG_OVERRIDES)
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config)

"""The 1B-class GPU configs in examples/llama1b/ load and validate for their cluster (2 groups x 8
GPUs = world 16), describe the model the plan beside them was computed for, and the plan text is
what `codistill-ds plan` prints today (no GPU needed: shapes on the meta device)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from codistill_ds.backends.model import ModelRecipe
from codistill_ds.config import load_config
from codistill_ds.config.validation import ranks_per_group, validate
from launch import REPO

EXAMPLES = REPO / "examples" / "llama1b"
PARAMS = 953_223_168


@pytest.mark.parametrize("name, backend", [("zero3_bf16.yaml", "deepspeed"), ("fsdp2_bf16.yaml", "fsdp")])
def test_1b_configs_validate_for_world_16(name, backend, tmp_path, monkeypatch):
    cfg = load_config(str(EXAMPLES / name))
    monkeypatch.chdir(tmp_path)  # the data and tokenizer the YAML names, as a user would provide them
    for path in cfg.data.train_files:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()
    os.makedirs(cfg.data.tokenizer)
    validate(cfg, world_size=16, vocab_size=32000, cuda_available=True)
    assert ranks_per_group(cfg, 16) == 8 and cfg.backend.name == backend
    assert cfg.backend.precision == "bf16" and cfg.data.seq_len == cfg.model.max_seq_len == 2048
    assert ModelRecipe(cfg.model, 32000, 0.0, 0).num_parameters() == PARAMS


def test_plan_beside_the_configs_is_current():
    text = (EXAMPLES / "plan.txt").read_text()
    command = next(line for line in text.splitlines() if line.startswith("# codistill-ds plan --"))
    args = shlex.split(command[len("# codistill-ds plan"):])
    assert args[args.index("--params") + 1] == str(PARAMS)
    out = subprocess.run([sys.executable, "-m", "codistill_ds.cli", "plan", *args], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() in text, "regenerate examples/llama1b/plan.txt with the command on its second line"

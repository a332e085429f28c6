"""The 8B and 70B configs (examples/llama8b/, examples/llama70b/) validate for their clusters, describe
the Llama-3 shapes, split evenly over their TP degree, and the plan.txt beside them is what
`codistill-ds plan` prints today for exactly their settings (so it cannot go stale).

Each plan.txt is blocks of: a line "# codistill-ds plan for <what>", the command line
"# codistill-ds plan --...", then its output. Regenerate them with

    python tests/unit/test_examples_large.py --write
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128_256
GPUS_PER_NODE = 8
CONFIGS = {  # config -> (world, parameters of the Llama-3 shape: 2 V h + n (2 h^2 + 2 h h_kv + 3 h I + 2 h) + h)
    "llama8b/tp2_fsdp4_bf16.yaml": (16, 2 * VOCAB * 4096 + 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
                                                                  + 2 * 4096) + 4096),
    "llama8b/fsdp8_bf16.yaml": (16, 8_030_261_248),
    "llama70b/tp8_fsdp4_ac_bf16.yaml": (64, 2 * VOCAB * 8192 + 80 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672
                                                                      + 2 * 8192) + 8192),
}
COMPARISONS = {  # plan.txt blocks without a config of their own: (folder, why, the config they vary, --set-like flags)
    "llama70b": [("HSDP instead (replicate 2 x dp_shard 2 x tp 8; no config: it does not fit an 80 GB GPU)",
                  "llama70b/tp8_fsdp4_ac_bf16.yaml", {"--replicate": "2"})],
}


def plan_args(config: str) -> list[str]:
    """The `codistill-ds plan` flags that describe `config` on its cluster."""
    from codistill_ds.config import load_config
    from codistill_ds.config.validation import ranks_per_group

    cfg = load_config(str(REPO / "examples" / config))
    world, params = CONFIGS[config]
    m, d, c, p = cfg.model, cfg.data, cfg.codistill, cfg.parallel
    data_ranks = ranks_per_group(cfg, world) // p.tp
    args = ["--params", str(params), "--vocab", str(VOCAB), "--seq-len", str(d.seq_len),
            "--batch", str(d.exchange_batch_size), "--train-batch", str(d.micro_batch_size * data_ranks * cfg.train.grad_accum),
            "--topk", str(c.topk), "--interval", str(c.interval), "--groups", str(c.groups), "--world", str(world),
            "--micro-batch", str(d.micro_batch_size), "--hidden", str(m.hidden_size), "--layers", str(m.num_layers),
            "--heads", str(m.num_heads), "--kv-heads", str(m.num_kv_heads), "--intermediate", str(m.intermediate_size),
            "--tp", str(p.tp), "--replicate", str(p.replicate), "--gpus-per-node", str(GPUS_PER_NODE),
            "--activation-checkpointing", m.activation_checkpointing]
    if cfg.train.grad_accum > 1:
        args += ["--grad-accum", str(cfg.train.grad_accum)]
    return args


def run(args: list[str]) -> str:
    from codistill_ds.commands.plan import add_plan_arguments, run_plan

    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_plan(parser.parse_args(args)) == 0
    return out.getvalue()


def blocks(folder: str) -> list[tuple[str, list[str]]]:
    """(what, flags) of every block plan.txt in `folder` should hold, in order."""
    out = [(f"examples/{name}", plan_args(name)) for name in CONFIGS if name.startswith(folder + "/")]
    for why, base, changes in COMPARISONS.get(folder, []):
        args = plan_args(base)
        for flag, value in changes.items():
            args[args.index(flag) + 1] = value
        out.append((f"{why}, from examples/{base}", args))
    return out


def render(folder: str) -> str:
    parts = []
    for what, args in blocks(folder):
        parts.append(f"# codistill-ds plan for {what} (an estimate on paper, not a measurement):\n"
                     f"# codistill-ds plan {shlex.join(args)}\n{run(args)}")
    return "\n".join(parts)


def parse_blocks(text: str) -> list[tuple[str, list[str], str]]:
    """(what, flags, output) of each block of a checked-in plan.txt."""
    found = []
    for chunk in text.split("# codistill-ds plan for ")[1:]:
        what, command, body = chunk.split("\n", 2)
        assert command.startswith("# codistill-ds plan --"), command
        found.append((what.split(" (an estimate")[0], shlex.split(command[len("# codistill-ds plan"):]), body))
    return found


@pytest.mark.parametrize("folder", ["llama8b", "llama70b"])
def test_plan_txt_is_current(folder):
    text = (REPO / "examples" / folder / "plan.txt").read_text()
    assert text.startswith("# codistill-ds plan for examples/") and text.splitlines()[1].startswith("# codistill-ds plan --")
    checked = parse_blocks(text)
    wanted = blocks(folder)
    assert [(w, a) for w, a, _ in checked] == wanted, "a config changed: python tests/unit/test_examples_large.py --write"
    for (_, args, body) in checked:
        assert body.rstrip("\n") == run(args).rstrip("\n"), "regenerate: python tests/unit/test_examples_large.py --write"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_large_configs_validate_for_their_world(config, tmp_path, monkeypatch):
    """validate(load_config(path), world) as every rank runs it at start, the TP split of the
    model (backends/tensor_parallel.check_tp_divisible, incl. vocabulary 128,256 / T), and the
    parameter count of the meta-device model against the closed form above."""
    from codistill_ds.backends.model import ModelRecipe, build_hf_config
    from codistill_ds.backends.tensor_parallel import check_tp_divisible
    from codistill_ds.config import load_config
    from codistill_ds.config.validation import ranks_per_group, validate

    cfg = load_config(str(REPO / "examples" / config))
    world, params = CONFIGS[config]
    monkeypatch.chdir(tmp_path)  # the data and tokenizer the YAML names, as a user would provide them
    for path in cfg.data.train_files:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()
    os.makedirs(cfg.data.tokenizer)
    validate(cfg, world_size=world, vocab_size=VOCAB, cuda_available=True)
    check_tp_divisible(build_hf_config(cfg.model, VOCAB, 0.0), cfg.parallel.tp)
    assert VOCAB % cfg.parallel.tp == 0 and GPUS_PER_NODE % cfg.parallel.tp == 0
    S = ranks_per_group(cfg, world)
    assert (cfg.codistill.groups, S) == ((2, 8) if world == 16 else (2, 32))
    assert cfg.backend.name == "fsdp" and cfg.backend.precision == "bf16"
    assert cfg.data.seq_len == cfg.model.max_seq_len
    assert ModelRecipe(cfg.model, VOCAB, 0.0, 0).num_parameters() == params


def test_exchange_batch_splits_over_data_ranks_under_tp():
    """With T > 1 an exchange batch needs only the A = S / T data ranks to divide it (the 70B
    config sends 4 sequences from 32 ranks: 4 data ranks x 8 TP ranks); T = 1 keeps S."""
    from codistill_ds.config import ConfigError, load_config
    from codistill_ds.config.validation import validate

    ok = load_config(None, ["backend.name=fsdp", "parallel.tp=2", "data.exchange_batch_size=2", "data.seq_len=64", "model.max_seq_len=64"])
    validate(ok, world_size=8, cuda_available=False)  # S = 4, A = 2
    bad = load_config(None, ["backend.name=fsdp", "parallel.tp=2", "data.exchange_batch_size=3"])
    with pytest.raises(ConfigError, match="3 is not divisible by the 2 data ranks per group"):
        validate(bad, world_size=8, cuda_available=False)
    with pytest.raises(ConfigError, match="2 is not divisible by the 4 ranks per group"):
        validate(load_config(None, ["data.exchange_batch_size=2"]), world_size=8, cuda_available=False)


def test_the_70b_plan_says_why_this_layout():
    """The figures the YAML's comment and the README quote, from the plan itself."""
    from codistill_ds.plan.bytes import make_plan
    from codistill_ds.plan.group import group_plan

    plan = make_plan(CONFIGS["llama70b/tp8_fsdp4_ac_bf16.yaml"][1], VOCAB, 8192, 4, 32, 16, 2, 64, train_batch=4,
                     gpus_per_node=8)
    kw = {"tp": 8, "gpus_per_node": 8, "activation_checkpointing": "full", "heads": 64, "kv_heads": 8, "intermediate": 28672}
    tp8, hsdp = group_plan(plan, 1, 8192, 80, **kw), group_plan(plan, 1, 8192, 80, replicate=2, **kw)
    assert tp8.memory.total_bytes < 80e9 < hsdp.memory.total_bytes
    assert tp8.memory.model_state_bytes + tp8.memory.activations["none"] > 80e9  # checkpointing is needed
    assert hsdp.traffic.leaving_node_bytes == pytest.approx(tp8.traffic.leaving_node_bytes)
    assert 16 * plan.params / 8 > 80e9  # FSDP (or HSDP) inside one node


@pytest.mark.parametrize("which, config, nodes", [("8b-tp2", "llama8b/tp2_fsdp4_bf16.yaml", 2),
                                                  ("8b-fsdp8", "llama8b/fsdp8_bf16.yaml", 2),
                                                  ("70b", "llama70b/tp8_fsdp4_ac_bf16.yaml", 8)])
def test_launch_script_lines(which, config, nodes, tmp_path):
    """launch/llama_large.sh with stand-in `deepspeed` and `torchrun` that print their arguments:
    the config exists, the hostfile has as many 8-GPU nodes as the config's world needs."""
    import subprocess

    for tool in ("deepspeed", "torchrun"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "NODE_RANK": "0"}
    script = str(REPO / "launch" / "llama_large.sh")
    ds = subprocess.run([script, which], env=env, capture_output=True, text=True, check=True).stdout.split()
    tr = subprocess.run([script, which, "torchrun", "--set", "train.steps=1"], env=env, capture_output=True,
                        text=True, check=True).stdout.split()
    assert ds[ds.index("--config") + 1] == tr[tr.index("--config") + 1] == f"examples/{config}"
    hosts = (REPO / ds[ds.index("--hostfile") + 1]).read_text().splitlines()
    assert [h.split()[1] for h in hosts if h and not h.startswith("#")] == ["slots=8"] * nodes
    assert nodes * 8 == CONFIGS[config][0]
    assert tr[tr.index("--nnodes") + 1] == str(nodes) and tr[tr.index("--nproc_per_node") + 1] == "8"
    assert tr[-2:] == ["--set", "train.steps=1"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/unit/test_examples_large.py --write")
    sys.path.insert(0, str(REPO))
    for folder in ("llama8b", "llama70b"):
        (REPO / "examples" / folder / "plan.txt").write_text(render(folder))
        print(f"wrote examples/{folder}/plan.txt")

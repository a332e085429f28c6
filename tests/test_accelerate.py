"""`accelerate launch` with each shipped YAML runs the real CLI, and its settings map onto the config.

Every shipped YAML launches, side by side: zero3.yaml as shipped (4 CPU ranks = 2 groups x 2),
zero2.yaml and fsdp2.yaml with `--num_processes 2` (2 groups x 1) to keep the suite short;
in-group sharding over several ranks is checked by the partition tests. The mapping
(`integrations/accelerate.py`) is a pure function of the environment and is checked without
launching anything.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from codistill_ds.config import Config, ConfigError
from codistill_ds.integrations.accelerate import apply_launch_env
from launch import REPO, child_env, read_jsonl

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS = 3
YAMLS = {"zero2": ("deepspeed", "ds_configs/zero2.json", 2), "zero3": ("deepspeed", "ds_configs/zero3.json", 4),
         "fsdp2": ("fsdp", None, 2)}
"""YAML name -> (backend, DeepSpeed config, ranks launched)."""


def accelerate_train(name: str, run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           f"launch/accelerate/{name}.yaml", "--num_processes", str(YAMLS[name][2]), "-m", "codistill_ds.cli", "train", "--config", CONFIG,
           "--run-dir", str(run_dir), "--set", f"train.steps={STEPS}", "--set", f"train.eval_interval={STEPS}"]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=420, check=False)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accel")
    with ThreadPoolExecutor(len(YAMLS)) as pool:
        jobs = {name: pool.submit(accelerate_train, name, tmp / name) for name in YAMLS}
        return {name: (job.result(), tmp / name) for name, job in jobs.items()}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", list(YAMLS))
def test_accelerate_launch_runs_and_writes_metrics(launched, name):
    proc, run_dir = launched[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "codistill-ds: from accelerate launch:" in proc.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert {(r["group"], r["step"]) for r in records} == {(g, s) for g in (0, 1) for s in range(1, STEPS + 1)}
    assert all(r["cross_group_bytes"] > 0 and r["distill_loss"] is not None for r in records)
    backend = yaml.safe_load((run_dir / "config.yaml").read_text())["backend"]
    engine, ds_config, _ = YAMLS[name]
    assert backend["name"] == engine
    if ds_config:
        assert backend["ds_config"] == ds_config


def test_launch_env_mapping():
    def mapped(**env):
        cfg = Config()
        cfg.backend.name = "fsdp"
        return cfg, apply_launch_env(cfg, env)

    cfg, applied = mapped()
    assert applied == [] and cfg.backend.name == "fsdp"  # not under accelerate: untouched
    cfg, _ = mapped(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    assert (cfg.backend.name, cfg.backend.ds_config) == ("deepspeed", "ds_configs/zero2.json")
    cfg, _ = mapped(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
                    ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu", ACCELERATE_MIXED_PRECISION="bf16")
    assert (cfg.backend.ds_config, cfg.backend.precision) == ("ds_configs/zero3_offload.json", "bf16")
    cfg, _ = mapped(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE="my/ds.json",
                    ACCELERATE_DEEPSPEED_ZERO_STAGE="1")
    assert cfg.backend.ds_config == "my/ds.json"  # the file wins over the stage
    cfg, _ = mapped(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false",
                    FSDP_OFFLOAD_PARAMS="true")
    assert (cfg.backend.name, cfg.backend.fsdp_reshard_after_forward, cfg.backend.fsdp_cpu_offload) == \
        ("fsdp", False, True)
    for env, field in [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "backend.name"),
                       ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"},
                        "backend.ds_config"),
                       ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "fp16"},
                        "backend.precision")]:
        with pytest.raises(ConfigError) as err:
            mapped(**env)
        assert err.value.field == field

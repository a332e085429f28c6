"""`accelerate launch` with each shipped YAML runs the real CLI at 2 groups x 2 ranks, shards
inside each group only, and its settings map onto the config.

One launch per YAML (zero2, zero3, fsdp2), as shipped (4 processes), all at once: the rank
program is `codistill-ds train` itself (tests/workers/accelerate_cli.py only records the engine
it builds). Checked: the launch mapping took effect, every group wrote its records, each rank
holds 1/2 of every parameter (ZeRO-2: of every flat optimizer partition) and the groups end with
different weights from identical initial ones (the global-mpu trap would give 1/4, or one model).
The mapping (`integrations/accelerate.py`) is a pure function of the environment and is also
checked without launching anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from partitions import assert_sharded_within_groups

from codistill_ds.config import Config, ConfigError
from codistill_ds.config.accelerate_env import apply_launch_env
from launch import REPO, WORKERS, child_env, read_jsonl, run_captured

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS, RANKS = 3, 4
YAMLS = {"zero2": ("deepspeed", "ds_configs/zero2.json"), "zero3": ("deepspeed", "ds_configs/zero3.json"),
         "fsdp2": ("fsdp", None)}
"""YAML name -> (backend, DeepSpeed config)."""


def accelerate_train(name: str, out: Path) -> subprocess.CompletedProcess:
    out.mkdir(parents=True)
    sets = [f"train.steps={STEPS}", f"train.eval_interval={STEPS}", "codistill.alpha=1", "codistill.same_init=true"]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           f"launch/accelerate/{name}.yaml", str(WORKERS / "accelerate_cli.py"), str(out), "--config", CONFIG,
           "--run-dir", str(out / "run"), *[a for s in sets for a in ("--set", s)]]
    return run_captured(cmd, 800, cwd=REPO, env=child_env())  # a timeout stops every rank


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accel")
    with ThreadPoolExecutor(len(YAMLS)) as pool:
        jobs = {name: pool.submit(accelerate_train, name, tmp / name) for name in YAMLS}
        return {name: (job.result(), tmp / name) for name, job in jobs.items()}


@pytest.mark.timeout(900)  # the first one waits for all 12 ranks: 344 s at load average 20 on 2 cores
@pytest.mark.parametrize("name", list(YAMLS))
def test_accelerate_launch_shards_within_groups(launched, name):
    proc, out = launched[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "codistill-ds: from accelerate launch:" in proc.stderr
    assert yaml.safe_load((REPO / "launch" / "accelerate" / f"{name}.yaml").read_text())["num_processes"] == RANKS
    run = out / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert {(r["group"], r["step"]) for r in records} == {(g, s) for g in (0, 1) for s in range(1, STEPS + 1)}
    assert all(r["cross_group_bytes"] > 0 and r["distill_loss"] is not None for r in records)
    backend = yaml.safe_load((run / "config.yaml").read_text())["backend"]
    engine, ds_config = YAMLS[name]
    assert backend["name"] == engine
    if ds_config:
        assert backend["ds_config"] == ds_config
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert_sharded_within_groups(res, S=2)
    assert json.loads((run / "summary.json").read_text())["ranks_per_group"] == 2


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

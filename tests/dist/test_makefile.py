"""The Makefile's machine detection, with a fake `nvidia-smi` on PATH (no GPU needed).

DeepSpeed rejects an empty DS_ACCELERATOR, so the Makefile must export "cuda" where nvidia-smi
answers, "cpu" where it is missing or fails (driver gone), and keep a value the user chose.
`make gpu-check` must stop with one clear line on a machine without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from launch import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def fake_smi(tmp_path: Path, exit_code: int) -> Path:
    bin_dir = tmp_path / f"bin{exit_code}"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\nexit {exit_code}\n")
    smi.chmod(0o755)
    return bin_dir


def make(target: str, path_dirs: list[Path], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    # Only system tools (and the fake) on PATH, so a real nvidia-smi here cannot change the answer.
    base["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    base.update(env)
    return subprocess.run(["make", "-s", target], cwd=REPO, env=base, capture_output=True, text=True,
                          timeout=60, check=False)


def accelerator(path_dirs: list[Path], **env: str) -> str:
    proc = make("print-accelerator", path_dirs, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(Path("/usr/bin/nvidia-smi").exists() or Path("/bin/nvidia-smi").exists(),
                    reason="a real nvidia-smi in /usr/bin decides this machine's answer")
def test_ds_accelerator_follows_nvidia_smi(tmp_path):
    gpu, broken = fake_smi(tmp_path, 0), fake_smi(tmp_path, 9)
    assert accelerator([gpu]) == "DS_ACCELERATOR=cuda"
    assert accelerator([gpu], DS_ACCELERATOR="") == "DS_ACCELERATOR=cuda"  # empty is replaced
    assert accelerator([broken]) == "DS_ACCELERATOR=cpu"  # nvidia-smi without a driver
    assert accelerator([]) == "DS_ACCELERATOR=cpu"
    assert accelerator([gpu], DS_ACCELERATOR="cpu") == "DS_ACCELERATOR=cpu"  # the user's choice stays


@pytest.mark.skipif(Path("/usr/bin/nvidia-smi").exists() or Path("/bin/nvidia-smi").exists(),
                    reason="a real nvidia-smi in /usr/bin decides this machine's answer")
def test_gpu_check_refuses_a_machine_without_gpu(tmp_path):
    proc = make("gpu-check", [fake_smi(tmp_path, 9)])
    assert proc.returncode != 0
    assert "gpu-check: no NVIDIA GPU" in proc.stderr + proc.stdout, proc.stderr

"""A non-editable install finds the shipped DeepSpeed configs, and ships every subpackage.

`backend.ds_config: ds_configs/zero3.json` (the default, and every example) must resolve after
`pip install .` from any directory, not only in a checkout (pyproject.toml maps the top-level
ds_configs/ into the package)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib

from launch import REPO


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "codistill_ds").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


@pytest.mark.timeout(300)
def test_ds_configs_resolve_after_a_non_editable_install(tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=280, check=False)
    assert pip.returncode == 0, pip.stderr[-3000:]
    probe = ("import codistill_ds, json; from codistill_ds.config import resolve_path; "
             "from codistill_ds.config.validation import validate; from codistill_ds.config import load_config; "
             "validate(load_config(None), 4); p = resolve_path('ds_configs/zero3.json'); "
             "print(json.dumps([codistill_ds.__file__, p, json.load(open(p))['zero_optimization']['stage']]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, path, stage = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert module.startswith(str(target)) and path.startswith(str(target)), (module, path)
    assert stage == 3

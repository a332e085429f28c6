"""Every collective of the library goes through codistill_ds/distributed/comm.py, which puts tensors on the
device their process group serves (NCCL: CUDA, gloo: CPU, "cpu:gloo,cuda:nccl": both).

The scan reads the source (AST), so it also covers code paths that only run on GPUs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from codistill_ds.distributed import comm

PACKAGE = Path(__file__).resolve().parents[2] / "codistill_ds"

COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "reduce", "all_gather", "all_gather_into_tensor",
    "all_gather_coalesced", "_all_gather_base", "gather", "scatter", "broadcast", "barrier",
    "monitored_barrier", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "all_to_all", "all_to_all_single", "all_gather_object", "gather_object", "scatter_object_list",
    "broadcast_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list",
    "recv_object_list",
}  # fmt: skip
"""torch.distributed's collective and point-to-point calls."""

ALLOWED = {"distributed/comm.py"}


def _dist_aliases(tree: ast.Module) -> tuple[set[str], set[str], list[str]]:
    """(names bound to torch.distributed, names bound to torch, collectives imported by name)."""
    dist_names, torch_names, imported = set(), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    dist_names.add(a.asname)
                elif a.name.split(".")[0] == "torch":
                    torch_names.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    dist_names.add(a.asname or a.name)
                elif node.module.startswith("torch.distributed") and a.name in COLLECTIVES:
                    imported.append(f"line {node.lineno}: from {node.module} import {a.name}")
    return dist_names, torch_names, imported


def _is_dist(expr: ast.expr, dist_names: set[str], torch_names: set[str]) -> bool:
    if isinstance(expr, ast.Name):
        return expr.id in dist_names
    return (isinstance(expr, ast.Attribute) and expr.attr == "distributed"
            and isinstance(expr.value, ast.Name) and expr.value.id in torch_names)


def direct_collectives(source: str) -> list[str]:
    """Collective calls on torch.distributed in `source`, as 'line N: dist.name'."""
    tree = ast.parse(source)
    dist_names, torch_names, found = _dist_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr in COLLECTIVES and _is_dist(f.value, dist_names, torch_names):
                found.append(f"line {node.lineno}: {ast.unparse(f)}")
    return found


def test_scanner_finds_every_spelling():
    src = ("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
           "from torch.distributed import barrier\n"
           "dist.all_reduce(x)\nd2.broadcast_object_list(b)\ntorch.distributed.send(t, 1)\n"
           "comm.all_reduce(x)\ndist.get_rank()\nother.all_reduce(x)\n")
    found = direct_collectives(src)
    assert [f.split(":")[0] for f in found] == ["line 4", "line 5", "line 6", "line 7"], found


def test_no_module_calls_a_collective_outside_comm():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        found = direct_collectives(path.read_text())
        if found:
            offenders[rel] = found
    assert not offenders, f"call these through codistill_ds.distributed.comm: {offenders}"


@pytest.mark.parametrize("backend, served", [
    ("gloo", {"cpu"}), ("nccl", {"cuda"}), ("cpu:gloo,cuda:nccl", {"cpu", "cuda"}),
    ("cuda:nccl", {"cuda"}), ("GLOO", {"cpu"}),
])
def test_served_device_types(backend, served):
    assert comm.served_device_types(backend) == served


def test_target_device_moves_only_what_the_group_cannot_carry():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert comm.target_device(cpu, "gloo", cuda_available=True) == cpu
    assert comm.target_device(cpu, "cpu:gloo,cuda:nccl", cuda_available=True) == cpu
    assert comm.target_device(meta, None, cuda_available=True) == cpu  # torchft-style group
    assert comm.target_device(cpu, "nccl", cuda_available=False) == cpu  # nothing to move to
    assert comm.resolve_exchange_backend("auto", True) == "nccl"
    assert comm.resolve_exchange_backend("auto", False) == "gloo"
    assert comm.resolve_exchange_backend("gloo", True) == "gloo"


def test_group_device_is_cpu_for_gloo_groups():
    """A real one-rank gloo world in this process: its default group and a new_group of it."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sub = dist.new_group([0], backend="gloo")
        assert comm.group_device() == torch.device("cpu")
        assert comm.group_device(sub) == torch.device("cpu")
        t = torch.tensor([1.0, 2.0])
        assert comm.all_reduce(t, group=sub) is t and t.tolist() == [1.0, 2.0]
        assert comm.reduce_numbers([3, 4]) == [3.0, 4.0]
        assert [x.tolist() for x in comm.all_gather(t)] == [[1.0, 2.0]]
        comm.barrier(sub)
    finally:
        dist.destroy_process_group()

"""The package's shape, checked: no import cycle, the core never imports an integration, no
module over 400 lines, and the setup pieces written once (docs/design.md, "Layout" and "Setup").

The import graph is read from the source (every `import`/`from ... import` of `codistill_ds`,
lazy ones inside functions included, relative ones resolved), so a cycle that only shows at run
time on some code path is still caught. `check_package` takes the package root so the test can
also run it on a deliberately broken copy and see each rule fire.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "codistill_ds"
MAX_LINES = 400


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (a package import means its __init__)."""
    files = {_module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in files:  # `a.b.c` may name an attribute of module `a.b`
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith(root.name):
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check_package(root: Path) -> list[str]:
    """Every broken rule, as one line each."""
    graph = import_graph(root)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    integrations = f"{root.name}.integrations"
    for module, deps in sorted(graph.items()):
        if module.startswith(integrations):
            continue
        for dep in sorted(deps):
            if dep.startswith(integrations):
                problems.append(f"core module {module} imports {dep}")
    for path in sorted(root.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            problems.append(f"{path.relative_to(root.parent)} has {n} lines (> {MAX_LINES})")
    return problems


def test_package_has_no_cycle_no_core_to_integration_import_and_no_long_module():
    assert check_package(PACKAGE) == []


def test_each_rule_fires_on_a_broken_copy(tmp_path):
    copy = tmp_path / "codistill_ds"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "exchange" / "wire.py").write_text((copy / "exchange" / "wire.py").read_text()
                                               + "\nfrom codistill_ds.exchange.losses import distill_loss\n")
    (copy / "plan" / "units.py").write_text((copy / "plan" / "units.py").read_text()
                                            + "\n\ndef _late():\n    from ..integrations import exchange_data\n")
    (copy / "schedules.py").write_text((copy / "schedules.py").read_text() + "\n" * 400)
    problems = check_package(copy)
    assert any(p.startswith("import cycle:") and "codistill_ds.exchange.wire" in p
               and "codistill_ds.exchange.losses" in p for p in problems), problems
    assert "core module codistill_ds.plan.units imports codistill_ds.integrations.exchange_data" in problems
    assert any(p.startswith("codistill_ds/schedules.py has") for p in problems), problems


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}


def _where(pattern: str) -> list[str]:
    return sorted(f for f, text in _sources().items() if re.search(pattern, text, re.MULTILINE))


def test_setup_pieces_are_written_once():
    """One place each builds the exchange engine, derives a group's seed, joins the groups, runs
    the step schedule (alpha and the engine's step) and picks a free port."""
    assert _where(r"ExchangeEngine\(") == ["exchange/setup.py"]
    assert _where(r"^def group_seed\b") == ["exchange/setup.py"]
    assert _where(r"same_init else") == ["exchange/setup.py"]
    assert _where(r"\.join\(cd\.groups|transport\.join\(") == ["exchange/setup.py"]
    assert _where(r"alpha_at\(") == ["exchange/distiller.py", "schedules.py"]
    assert _where(r"engine\.step\(\w") == ["exchange/distiller.py"]  # DeepSpeed's engine.step() is not it
    assert _where(r"^def free_port\b") == ["distributed/launching.py"]
    assert _where(r"\.bind\(\(\"127\.0\.0\.1\", 0\)\)") == ["distributed/launching.py"]

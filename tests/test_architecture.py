"""The package's shape: an import graph without cycles, one metatrain adapter facade.

The graph is read from the source (every ``import`` statement, module level or inside
functions, since a function-level import is still a dependency), so the test needs no
imports of the package and fails on the first edge that breaks a rule.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import ase_petft

PACKAGE = pathlib.Path(ase_petft.__file__).resolve().parent
ADAPTER = "ase_petft._metatrain"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: pathlib.Path, known: dict) -> set:
    """Modules of the package that ``module`` imports (a name imported from a package
    counts as the submodule when one of that name exists)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ase_petft"))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            if not target.startswith("ase_petft"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    found.discard(module)
    return {m for m in found if m in known}


def _graph() -> dict:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_has_no_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detector_finds_a_cycle():
    # the oracle for the test above: a planted cycle must be reported
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_adapter_imports_metatrain_and_its_submodules():
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith(ADAPTER):
            continue
        private = sorted(t for t in targets if t.startswith(ADAPTER + "."))
        assert not private, f"{module} reaches into the adapter's submodules {private}"
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module.startswith(ADAPTER):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            assert not any(n.split(".")[0] == "metatrain" for n in names), (
                f"{module} imports metatrain directly; go through ase_petft._metatrain")


def test_the_adapter_facade_lists_what_it_exports():
    from ase_petft import _metatrain

    missing = [name for name in _metatrain.__all__ if not hasattr(_metatrain, name)]
    assert not missing
    used = set()
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path).startswith(ADAPTER):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "_metatrain"):
                used.add(node.attr)
    assert used <= set(_metatrain.__all__), sorted(used - set(_metatrain.__all__))


def test_importing_the_package_leaves_metatrain_alone():
    code = ("import sys, logging; cls = logging.getLoggerClass(); import ase_petft; "
            "from ase_petft import FineTuneConfig, LabelBuffer, every; "
            "assert 'metatrain' not in sys.modules, 'metatrain imported'; "
            "assert logging.getLoggerClass() is cls")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

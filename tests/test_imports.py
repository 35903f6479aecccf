"""The library's import graph follows the data flow (issue 18; style guide, "Layout").

Rooms, lowest first; a module imports only from its own room or rooms below it. Imports of
``sum.*`` sit at module top (the graph is visible where a reader looks), except in the CLI, whose
commands import their stage's module when run so that ``sumseg params`` does not load torch. No
name starting with ``_`` is imported from another module. Module-level imports have no cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SUM = Path(__file__).resolve().parent.parent / "sum"

ROOMS = [
    ("base", ["sum.io", "sum.redact", "sum.tasks", "sum.config", "sum.progress", "sum.tracking"]),
    ("data", ["sum.data"]),
    ("model", ["sum.model"]),
    ("pseudo", ["sum.pseudo"]),
    ("uncertainty", ["sum.uncertainty"]),
    ("train", ["sum.train"]),
    ("eval", ["sum.eval"]),
    ("registry", ["sum.registry"]),
    ("cli", ["sum.cli", "sum.__main__", "sum"]),
]
LAZY_SUM_IMPORTS = {"sum.cli"}  # stage modules imported by the command that runs them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SUM.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SUM.rglob("*.py"))}


def room(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module}: in no room of this test's ROOMS"
    return best[0]


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def sum_imports(module: str):
    """(imported module, names, line, at module top) for each import of ``sum.*`` in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sum" or alias.name.startswith("sum."):
                    yield alias.name, [], node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if target == "sum" or target.startswith("sum."):
                names = [a.name for a in node.names]
                # ``from sum.x import y`` where y is a submodule imports the submodule
                subs = [n for n in names if f"{target}.{n}" in MODULES]
                for sub in subs:
                    yield f"{target}.{sub}", [], node.lineno, id(node) in top
                rest = [n for n in names if n not in subs]
                if rest or not subs:
                    yield target, rest, node.lineno, id(node) in top


def test_every_module_is_in_a_room():
    for module in MODULES:
        room(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_come_from_the_same_room_or_below(module):
    here = room(module)
    upward = [f"line {line}: {target} ({ROOMS[room(target)][0]})"
              for target, _, line, _ in sum_imports(module) if room(target) > here]
    assert not upward, f"{module} ({ROOMS[here][0]}) imports from rooms above it: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_modules_and_sum_imports_are_at_the_top(module):
    private = [f"line {line}: {target}.{n}" for target, names, line, _ in sum_imports(module)
               for n in names if n.startswith("_") and target != module]
    assert not private, f"{module} imports private names of other modules: {private}"
    if module not in LAZY_SUM_IMPORTS:
        inner = [f"line {line}: {target}" for target, _, line, at_top in sum_imports(module) if not at_top]
        assert not inner, f"{module} imports sum modules inside functions: {inner}"


def test_module_level_imports_have_no_cycles():
    graph = {m: {t for t, _, _, top in sum_imports(m) if top and t in MODULES and t != m} for m in MODULES}
    # a package's __init__ importing its own submodules is how packages re-export; not a cycle
    for m in graph:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checks_are_not_vacuous(tmp_path, monkeypatch):
    """Each check fails on a module that breaks its rule."""
    bad = tmp_path / "sum"
    (bad / "data").mkdir(parents=True)
    (bad / "__init__.py").write_text("")
    (bad / "data" / "__init__.py").write_text("")
    (bad / "data" / "x.py").write_text("from sum.train.trainer import finetune\nfrom sum.data.y import _hidden\n"
                                       "def f():\n    from sum.data import y\n")
    (bad / "data" / "y.py").write_text("import sum.data.x\n_hidden = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SUM", bad)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {module_name(p): p for p in sorted(bad.rglob("*.py"))})
    with pytest.raises(AssertionError, match="rooms above"):
        test_imports_come_from_the_same_room_or_below("sum.data.x")
    with pytest.raises(AssertionError, match="private names"):
        test_no_private_name_crosses_modules_and_sum_imports_are_at_the_top("sum.data.x")
    (bad / "data" / "x.py").write_text("from sum.data.y import hidden\ndef f():\n    from sum.data import y\n")
    with pytest.raises(AssertionError, match="inside functions"):
        test_no_private_name_crosses_modules_and_sum_imports_are_at_the_top("sum.data.x")
    with pytest.raises(AssertionError, match="import cycle"):
        test_module_level_imports_have_no_cycles()

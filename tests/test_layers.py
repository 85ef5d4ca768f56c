"""The package's layering: each layer imports only from layers below it, at the top of the module.

Layers, lowest first (``docs/DESIGN.md``): core < signal < data < {demo, model} < retrieval <
train < ui < the command line. A module may import from its own subpackage and from lower
layers; chlib imports inside functions are not allowed (optional third-party packages may be
imported lazily), and there are no import cycles between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "chlib"
RANK = {"core": 0, "signal": 1, "data": 2, "demo": 3, "model": 3, "retrieval": 4, "train": 5,
        "ui": 6, "serve": 7, "__main__": 8, "__init__": 8}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _chlib_imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported chlib module, line, at module level) for every chlib import in ``tree``."""
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a module-level `if`/`try` still count as top level
        if isinstance(n, (ast.If, ast.Try)):
            top.update(id(c) for c in ast.walk(n))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "chlib" or name.startswith("chlib."):
                found.append((name, node.lineno, id(node) in top))
    return found


MODULES = _modules()
IMPORTS = {m: _chlib_imports(ast.parse(p.read_text(encoding="utf-8"))) for m, p in MODULES.items()}


def _resolve(name: str) -> str | None:
    """The chlib module an import name refers to (``chlib.a.b.func`` -> ``chlib.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_downward(module: str) -> None:
    src = _layer(module)
    bad = []
    for name, line, _ in IMPORTS[module]:
        target = _resolve(name)
        if target is None or target == "chlib":
            continue
        dst = _layer(target)
        if dst != src and RANK[dst] >= RANK[src]:
            bad.append(f"line {line}: {src} imports {target} ({dst} is not below {src})")
    assert not bad, f"{module}:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_chlib_imports_are_at_the_top(module: str) -> None:
    local = [f"line {line}: {name}" for name, line, top in IMPORTS[module] if not top]
    assert not local, f"{module} imports chlib inside functions:\n" + "\n".join(local)


def test_no_import_cycles() -> None:
    graph = {m: {t for n, _, _ in IMPORTS[m] if (t := _resolve(n)) and t != m and t != "chlib"}
             for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    tree = ast.parse("from chlib.ui import plots\n\ndef f():\n    from chlib.core import io\n")
    found = _chlib_imports(tree)
    assert ("chlib.ui", 1, True) in found and ("chlib.core", 4, False) in found

"""Imports read as the architecture says: no circles, and no first-party import hidden inside a function.

An import inside a function is how a circle is usually dodged; it is allowed
only for third-party modules that keep start-up fast (torch, Ray, Tune,
MLflow, ...), and in `cli/`, whose commands import the orchestrator lazily
(through its lazy exports). `TYPE_CHECKING` blocks are type hints, not imports.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("distill_core", "orchestrator", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def resolve(name: str) -> str | None:
    """The first-party module an imported name lives in (a module, or a name in a package/module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines |= set(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(first-party modules imported at module level, (line, module) imported inside a function)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    hints = type_checking_lines(tree)
    top, inner = set(), []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_function = {id(c) for f in functions for c in ast.walk(f) if c is not f}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        targets = {t for t in map(resolve, names) if t and t != module}
        if not targets or node.lineno in hints:
            continue
        if id(node) in in_function:
            inner += [(node.lineno, t) for t in sorted(targets)]
        else:
            top |= targets
    return top, inner


GRAPH = {m: imports_of(m)[0] for m in MODULES}


def cycles() -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), a package counting as its
    __init__ (a package importing its own submodules to register them is not a circle)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def edges(m):
        return [t for t in GRAPH[m] if not (m.startswith(t + ".") or t.startswith(m + "."))]

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges(v):
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

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    return out


def test_no_import_circles():
    assert cycles() == []


def test_no_first_party_import_inside_a_function():
    hidden = []
    for module, path in MODULES.items():
        if module.startswith("cli"):
            continue
        own = module.split(".")[0]
        for line, target in imports_of(module)[1]:
            if target.split(".")[0] == own:
                hidden.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert hidden == []


def test_cli_uses_only_the_orchestrators_exports():
    reached = {t for m in MODULES if m.startswith("cli") for t in GRAPH[m] if t.startswith("orchestrator")}
    assert reached <= {"orchestrator", "orchestrator.errors"}, reached


def test_the_check_sees_a_circle(tmp_path, monkeypatch):
    """The cycle finder itself: two modules importing each other are one circle."""
    monkeypatch.setitem(GRAPH, "orchestrator.fake_a", {"orchestrator.fake_b"})
    monkeypatch.setitem(GRAPH, "orchestrator.fake_b", {"orchestrator.fake_a"})
    assert ["orchestrator.fake_a", "orchestrator.fake_b"] in cycles()

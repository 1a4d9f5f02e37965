"""The package's import structure: layers only import downwards, and the backend has no cycles.

Layers, top to bottom: cli -> trainer -> node -> protocol -> fhe_backend. A module may import its
own layer or any layer below, never one above; inside fhe_backend no module may reach itself again
through its imports, so every module there can be read, tested and replaced from the leaves up.
Imports inside functions count as much as those at the top of a file: they hide a dependency
rather than remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository's folders are the subpackages of `cipherswarm`
PACKAGE = "cipherswarm"
LAYERS = ("cli", "trainer", "node", "protocol", "fhe_backend")  # top to bottom


def module_name(root: Path, path: Path) -> str:
    """``cipherswarm.a.b`` for ``root/a/b.py`` and for ``root/a/b/__init__.py``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Every module of ``packages`` under ``root`` -> the modules of those packages it imports,
    at any depth of its code. ``from P import name`` points at module ``P.name`` when there is one,
    else at ``P`` (whose namespace the name comes from); other libraries are left out."""
    files = {module_name(root, path): path for package in packages for path in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        # the package a relative import starts from: a package's __init__ is its own
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    start = here[: len(here) - node.level + 1]  # `.` is this package, `..` its parent
                    base = ".".join([*start, node.module] if node.module else start)
                else:
                    base = node.module or ""
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = (targets & files.keys()) - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (none exactly when the graph is acyclic),
    each as the modules along it, first and last the same."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[tuple[str, str]]:
    """(importer, imported) for every import of a layer above the importer's."""
    def rank(module: str) -> int:
        return layers.index(module.split(".")[1])

    return sorted((src, dst) for src, targets in graph.items() for dst in targets if rank(dst) < rank(src))


def test_fhe_backend_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, ("fhe_backend",))
    assert f"{PACKAGE}.fhe_backend.evaluator" in graph  # the graph is the real one
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_layer_imports_a_layer_above_it() -> None:
    graph = import_graph(ROOT, LAYERS)
    assert {module.split(".")[1] for module in graph} == set(LAYERS)
    upward = upward_imports(graph)
    assert not upward, "imports of a layer above:\n" + "\n".join(f"{src} imports {dst}" for src, dst in upward)


def test_the_checks_catch_cycles_and_upward_imports(tmp_path: Path) -> None:
    """A tree with a function-level cycle and a function-level upward import, beside a downward
    import and a package-relative one that are both fine."""
    files = {
        "fhe_backend/__init__.py": "from .a import x\n",
        "fhe_backend/a.py": "from . import b\nx = 1\n",
        "fhe_backend/b.py": "def f():\n    from .a import x\n    return x\n",
        "fhe_backend/c.py": "import numpy\n\ndef g():\n    from cipherswarm.node import n\n",
        "node/__init__.py": "",
        "node/n.py": "from cipherswarm.fhe_backend import x\nfrom ..fhe_backend.c import g\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("node", "fhe_backend"))
    assert graph["cipherswarm.node.n"] == {"cipherswarm.fhe_backend", "cipherswarm.fhe_backend.c"}
    assert find_cycles({k: v for k, v in graph.items() if ".fhe_backend" in k}) == [
        ["cipherswarm.fhe_backend.a", "cipherswarm.fhe_backend.b", "cipherswarm.fhe_backend.a"]
    ]
    assert upward_imports(graph, ("node", "fhe_backend")) == [("cipherswarm.fhe_backend.c", "cipherswarm.node.n")]

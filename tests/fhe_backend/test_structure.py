"""The package's import structure: layers only import downwards, no module reaches itself again,
and the protocol is a pure core.

Layers, top to bottom: cli -> trainer -> node -> protocol -> fhe_backend. A module may import its
own layer or any layer below, never one above; no module may reach itself again through the
imports it runs, so every module can be read, tested and replaced from the leaves up. Imports
inside functions count as much as those at the top of a file: they hide a dependency rather than
remove it. Imports under `if TYPE_CHECKING:` never run: they count for the layers and for what a
package may import, not for cycles (two classes of one layer that name each other's type).
protocol/ is sans-I/O (bytes in, records or typed errors out, the clock passed in), so that it can
be tested and reused without a network stack: it imports neither trio, libp2p nor torch.
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


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`), which never run."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test).split("."):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def all_imports(root: Path, packages: tuple[str, ...], *, runtime: bool = False) -> dict[str, set[str]]:
    """Every module of ``packages`` under ``root`` -> the absolute names it imports, at any depth of
    its code (with ``runtime``, not those under ``if TYPE_CHECKING:``). ``from P import name``
    names ``P.name`` when that is a module of ``packages``, else ``P`` (whose namespace the name
    comes from)."""
    files = {module_name(root, path): path for package in packages for path in sorted((root / package).rglob("*.py"))}
    imports: dict[str, set[str]] = {}
    for name, path in files.items():
        # the package a relative import starts from: a package's __init__ is its own
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree) if runtime else set()
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    start = here[: len(here) - node.level + 1]  # `.` is this package, `..` its parent
                    base = ".".join([*start, node.module] if node.module else start)
                else:
                    base = node.module or ""
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        imports[name] = targets
    return imports


def import_graph(root: Path, packages: tuple[str, ...], *, runtime: bool = False) -> dict[str, set[str]]:
    """`all_imports`, keeping only the modules of ``packages``: other libraries are left out."""
    imports = all_imports(root, packages, runtime=runtime)
    return {name: (targets & imports.keys()) - {name} for name, targets in imports.items()}


def libraries(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module -> the top-level names of the other libraries it imports (`all_imports`' result)."""
    return {name: {t.split(".")[0] for t in targets if t.split(".")[0] != PACKAGE} for name, targets in imports.items()}


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


def test_no_import_cycle_anywhere() -> None:
    graph = import_graph(ROOT, LAYERS, runtime=True)
    assert f"{PACKAGE}.fhe_backend.evaluator" in graph and f"{PACKAGE}.node.streams" in graph  # the real graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


FORBIDDEN_IN_PROTOCOL = {"trio", "libp2p", "torch", "multiaddr"}  # I/O, the network stack, tensors


def test_protocol_imports_no_io_network_or_tensor_library() -> None:
    found = libraries(all_imports(ROOT, ("protocol",)))
    assert f"{PACKAGE}.protocol.signing" in found and "cryptography" in found[f"{PACKAGE}.protocol.signing"]
    bad = sorted((module, library) for module, names in found.items() for library in names & FORBIDDEN_IN_PROTOCOL)
    assert not bad, "protocol/ must stay sans-I/O:\n" + "\n".join(f"{m} imports {lib}" for m, lib in bad)


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
        "fhe_backend/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio.abc\n    from .e import y\n",
        "fhe_backend/e.py": "from .d import z\ny = 1\n",
        "node/__init__.py": "",
        "node/n.py": "from cipherswarm.fhe_backend import x\nfrom ..fhe_backend.c import g\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("node", "fhe_backend"))
    assert graph["cipherswarm.node.n"] == {"cipherswarm.fhe_backend", "cipherswarm.fhe_backend.c"}
    backend = {k: v for k, v in graph.items() if ".fhe_backend" in k}
    assert find_cycles(backend) == [
        ["cipherswarm.fhe_backend.a", "cipherswarm.fhe_backend.b", "cipherswarm.fhe_backend.a"],
        ["cipherswarm.fhe_backend.d", "cipherswarm.fhe_backend.e", "cipherswarm.fhe_backend.d"],
    ]
    runtime = import_graph(tmp_path, ("fhe_backend",), runtime=True)  # d's imports never run
    assert find_cycles(runtime) == [["cipherswarm.fhe_backend.a", "cipherswarm.fhe_backend.b", "cipherswarm.fhe_backend.a"]]
    assert libraries(all_imports(tmp_path, ("fhe_backend",)))["cipherswarm.fhe_backend.d"] == {"typing", "trio"}
    assert libraries(all_imports(tmp_path, ("node",)))["cipherswarm.node.n"] == set()
    assert upward_imports(graph, ("node", "fhe_backend")) == [("cipherswarm.fhe_backend.c", "cipherswarm.node.n")]

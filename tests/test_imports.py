"""The package's import graph is acyclic, counting imports inside functions too (a cycle that
only a call closes still ties two modules' load order together), and ``import
megatron_seqpar`` stays light."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import megatron_seqpar

PKG = pathlib.Path(megatron_seqpar.__file__).parent


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file). ``from pkg import
    sub`` is an edge to ``pkg.sub`` when that is a module, else to ``pkg``."""
    mods = {module_name(root, p): p for p in root.rglob("*.py")}
    graph = {}
    for me, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = me.split(".")[: len(me.split(".")) - node.level
                                       + (path.name == "__init__.py")]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != me:
                    edges.add(name)
        graph[me] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PKG)) == []


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from planted import b\n")
    (pkg / "b.py").write_text("def f():\n    from planted.c import x\n")  # inside a function
    (pkg / "c.py").write_text("from . import a\nx = 1\n")
    (pkg / "d.py").write_text("import planted.a\n")
    assert cycles(import_graph(pkg)) == [["planted.a", "planted.b", "planted.c"]]


def test_importing_the_package_loads_no_megatron_and_no_cpu_workaround():
    code = ("import sys, megatron_seqpar; print(sorted(m for m in sys.modules if m == "
            "'megatron' or m.startswith('megatron.') or m.endswith('cpu_workarounds')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_only_cpu_entry_points_import_the_cpu_workarounds():
    """In the package, ``cpu_workarounds`` is imported in one place: the driver's ``main``,
    inside its CPU branch. Nothing edits ``sys.path`` to reach ``tests/``."""
    sites = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    "cpu_workarounds" in (node.module + str([a.name for a in node.names])):
                sites.append((path.name, node.lineno))
    assert [name for name, _ in sites] == ["driver.py"]
    line = (PKG / "training" / "driver.py").read_text().split("\n")[sites[0][1] - 2]
    assert 'device == "cpu"' in line
    root = PKG.parent
    for path in [*root.glob("examples/*.py"), *root.glob("tools/*.py"), *PKG.rglob("*.py")]:
        assert '"tests"' not in path.read_text(), f"{path} reaches into tests/"


def test_design_notes_cited_are_in_the_repository():
    """Every docstring that points to a design note points to docs/design.md, which exists."""
    root = PKG.parent
    assert (root / "docs" / "design.md").is_file()
    for path in [*PKG.rglob("*.py"), *root.glob("tools/*.py"), *root.glob("tests/*.py")]:
        if path.name == "test_imports.py":  # names the words it looks for
            continue
        for word in ("DESIGN", "../shared"):
            assert word not in path.read_text(), f"{path} cites {word}"

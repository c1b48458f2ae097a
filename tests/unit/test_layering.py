"""The package stays layered: no import cycles inside mmtrain/ (module-level and function-level
imports alike), and no sys.path manipulation in shipped code (mmtrain/, launch/, recipes/)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Known cycles in code that is being reworked, as (importer, imported) edges. Only these edges are
# ignored; any other edge that closes a cycle fails. Empty: keep it so.
ALLOWED_EDGES: frozenset[tuple[str, str]] = frozenset()


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in modules:
            return cand
    return None


def import_edges(root: Path, package: str) -> dict[tuple[str, str], int]:
    """(importer, imported) -> first line, for every import of a module of `package`, wherever the
    import statement sits (module level, function, class, try/except, TYPE_CHECKING blocks)."""
    modules = module_files(root, package)
    edges: dict[tuple[str, str], int] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y / from .. import z
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                dst = _resolve(t, modules)
                if dst is None or dst == mod:
                    continue
                # importing a.b.c also runs a/__init__ and a/b/__init__: those count, except the
                # importer's own packages (always imported before it anyway)
                chain = dst.split(".")
                for k in range(1, len(chain) + 1):
                    anc = ".".join(chain[:k])
                    if anc in modules and anc != mod and not mod.startswith(anc + "."):
                        edges.setdefault((mod, anc), node.lineno)
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_no_import_cycles_in_mmtrain():
    edges = import_edges(REPO, "mmtrain")
    assert len(edges) > 50  # the walker does see the package's imports
    unknown_allowed = ALLOWED_EDGES - set(edges)
    assert not unknown_allowed, f"allow-listed edges no longer exist, drop them: {sorted(unknown_allowed)}"
    found = cycles({e: n for e, n in edges.items() if e not in ALLOWED_EDGES})
    report = []
    for comp in found:
        inside = sorted((a, b, n) for (a, b), n in edges.items() if a in comp and b in comp)
        report.append(" <-> ".join(comp) + "\n" + "\n".join(f"    {a} imports {b} (line {n})" for a, b, n in inside))
    assert not found, "import cycles in mmtrain/:\n" + "\n".join(report)


def test_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import g\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import c\n")
    edges = import_edges(tmp_path, "pkg")
    assert ("pkg.a", "pkg.sub.b") in edges and ("pkg.sub.b", "pkg.c") in edges and ("pkg.c", "pkg.a") in edges
    assert ("pkg.a", "pkg.sub") in edges and ("pkg.d", "pkg.c") in edges  # the package __init__ runs too
    assert cycles(edges) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert cycles({k: v for k, v in edges.items() if k != ("pkg.c", "pkg.a")}) == []


SYS_PATH_CALLS = {"insert", "append", "extend", "remove", "clear", "pop"}


def sys_path_uses(path: Path) -> list[int]:
    """Lines that change sys.path (sys.path.insert/append/..., assigning sys.path, site.addsitedir)."""
    tree = ast.parse(path.read_text(), str(path))
    lines = []

    def is_sys_path(n) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr in SYS_PATH_CALLS and is_sys_path(f.value):
                lines.append(node.lineno)
            if f.attr == "addsitedir" and isinstance(f.value, ast.Name) and f.value.id == "site":
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                    lines.append(node.lineno)
    return sorted(lines)


def test_no_sys_path_manipulation_in_shipped_code():
    files = [p for d in ("mmtrain", "launch", "recipes") if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 50
    bad = {str(p.relative_to(REPO)): lines for p in files if (lines := sys_path_uses(p))}
    scripts = [p for d in ("mmtrain", "launch", "recipes") if (REPO / d).is_dir() for p in (REPO / d).rglob("*")
               if p.suffix in (".sh", ".tmpl") and "sys.path" in p.read_text()]
    assert not bad and not scripts, f"sys.path changed in shipped code: {bad} {scripts}"


def test_sys_path_finder_sees_the_usual_forms(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import sys, site\nsys.path.insert(0, 'a')\nsys.path.append('b')\nsys.path[:0] = ['c']\n"
                 "sys.path += ['d']\nsite.addsitedir('e')\nprint(sys.path)\n")
    assert sys_path_uses(f) == [2, 3, 4, 5, 6]

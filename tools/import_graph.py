"""The package's import graph as layers: writes docs/architecture.md (``--check``: only compare).

Every module of src/autotinybert is read with `ast` (never imported); every import of another
module of the package counts, at module level or inside a function. A module's layer is 1 + the
highest layer of the modules it imports (layer 0 imports none of them), so a module only imports
modules of lower layers. Import cycles are listed; `tests/test_architecture.py` requires none, and
requires docs/architecture.md to be what this script writes.

Not counted: the implicit import of a package's ``__init__`` when one of its modules is imported,
and imports by computed name (the lazy ``__getattr__`` of ``autotinybert`` and ``autotinybert.tasks``).

    python tools/import_graph.py           # rewrite docs/architecture.md
    python tools/import_graph.py --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "autotinybert"
SOURCE = ROOT / "src" / PACKAGE
OUTPUT = ROOT / "docs" / "architecture.md"


def modules(source: Path = SOURCE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in sorted(source.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(source).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that ``name`` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:  # import a.b.c: the deepest module that exists
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:  # from . import glue: the module glue
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def graph(source: Path = SOURCE) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    found = modules(source)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted; dependencies come before dependants."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(node: str) -> None:  # the graph is a few dozen modules: recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            result.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def _shortest_cycle(edges: dict[str, set[str]], members: list[str]) -> list[str]:
    """A shortest cycle through the first member, within its component: [a, b, ..., a]."""
    start, inside = members[0], set(members)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges[node] & inside):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return [start]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per group of modules that import each other (directly or not)."""
    return [_shortest_cycle(edges, c) for c in components(edges) if len(c) > 1]


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with each subpackage (``tasks``, ``latency``, ...) as one node."""
    def node(name: str) -> str:
        return ".".join(name.split(".")[:2])

    collapsed: dict[str, set[str]] = {}
    for name, targets in edges.items():
        collapsed.setdefault(node(name), set()).update(node(t) for t in targets)
    return {name: targets - {name} for name, targets in collapsed.items()}


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Module -> layer: 1 + the highest layer it imports (modules of one cycle share a layer)."""
    layer: dict[str, int] = {}
    for component in components(edges):  # dependencies first
        inside = set(component)
        below = [layer[t] for m in component for t in edges[m] - inside]
        for member in component:
            layer[member] = 1 + max(below) if below else 0
    return layer


def description(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "(no docstring)"
    return " ".join(doc.strip().split("\n\n")[0].split())


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name != PACKAGE else f"{PACKAGE} (package)"


def render(source: Path = SOURCE) -> str:
    """The text of docs/architecture.md."""
    files = modules(source)
    edges = graph(source)
    layer = layers(edges)
    lines = [
        "# Architecture: the import graph as layers",
        "",
        "Generated by `python tools/import_graph.py` from the imports in `src/autotinybert` (at module",
        "level and inside functions); `tests/test_architecture.py` fails when this file is out of date",
        "or when modules import each other in a cycle. A module's layer is 1 + the highest layer of the",
        "package modules it imports (layer 0 imports none), so every module imports only modules of",
        "lower layers. Not counted: the implicit import of a package's `__init__` and imports by",
        "computed name (the lazy attributes of `autotinybert` and `autotinybert.tasks`).",
    ]
    for number in range(max(layer.values()) + 1):
        lines += ["", f"## Layer {number}", ""]
        for name in sorted(n for n in files if layer[n] == number):
            lines.append(f"- `{_short(name)}`: {description(files[name])}")
            if edges[name]:
                lines.append(f"  Imports: {', '.join(f'`{_short(t)}`' for t in sorted(edges[name]))}.")
    lines += ["", "## Import cycles", ""]
    found = cycles(edges)
    lines += [f"- {' -> '.join(f'`{_short(m)}`' for m in cycle)}" for cycle in found] or ["None."]
    lines += ["", "## Cycles between packages (for information)", "",
              "With each subpackage (`tasks`, `latency`, ...) taken as one node: each group of nodes that",
              "reach each other, with its shortest cycles (every edge in them is a module import that goes",
              "down the layers above, so these are not import cycles).", ""]
    collapsed = package_edges(edges)
    groups = [c for c in components(collapsed) if len(c) > 1]
    for group in groups:
        found = set()
        for member in group:
            ring = _shortest_cycle(collapsed, [member, *(o for o in group if o != member)])[:-1]
            start = ring.index(min(ring))  # one spelling per cycle: from its first module by name
            found.add(tuple(ring[start:] + ring[:start] + [ring[start]]))
        shortest = sorted(found, key=lambda c: (len(c), c))
        examples = "; ".join(" -> ".join(f"`{_short(m)}`" for m in c) for c in shortest if len(c) == len(shortest[0]))
        lines.append(f"- {', '.join(f'`{_short(m)}`' for m in group)}: {examples}")
    lines += [] if groups else ["None."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generated_doc import write_or_check

    sys.exit(write_or_check(render, OUTPUT, "tools/import_graph.py"))

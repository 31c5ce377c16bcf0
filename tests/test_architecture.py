"""The import graph (tools/import_graph.py): docs/architecture.md is current, and no modules of
the package import each other in a cycle (not even through imports inside functions)."""

from __future__ import annotations

import importlib.util
import textwrap

from conftest import REPO

_SPEC = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(import_graph)


def test_docs_architecture_is_up_to_date():
    written = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert written == import_graph.render(), "docs/architecture.md is out of date: run python tools/import_graph.py"


def test_no_import_cycles_between_modules():
    assert import_graph.cycles(import_graph.graph()) == []


def test_the_graph_sees_imports_inside_functions_and_reports_cycles(tmp_path):
    files = {
        "__init__.py": '"""The package."""\nfrom .low import value\n',
        "low.py": '"""Imports nothing."""\nvalue = 1\n',
        "mid.py": '"""Imports low at module level."""\nfrom . import low\n',
        "high.py": '"""Imports mid inside a function."""\ndef f():\n    from .mid import low\n',
        "sub/__init__.py": '"""A subpackage."""\n',
        "sub/leaf.py": '"""Imports high, and (back) mid inside a method."""\nfrom ..high import f\n'
                       'class A:\n    def g(self):\n        import autotinybert.mid\n',
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    edges = import_graph.graph(tmp_path)
    assert edges["autotinybert.high"] == {"autotinybert.mid"}
    assert edges["autotinybert.sub.leaf"] == {"autotinybert.high", "autotinybert.mid"}
    layer = import_graph.layers(edges)
    assert [layer[f"autotinybert.{m}"] for m in ("low", "mid", "high", "sub.leaf")] == [0, 1, 2, 3]
    assert import_graph.cycles(edges) == []

    (tmp_path / "low.py").write_text('"""Now imports high inside a function."""\ndef h():\n    from .high import f\n')
    edges = import_graph.graph(tmp_path)
    assert import_graph.cycles(edges) == [["autotinybert.high", "autotinybert.mid", "autotinybert.low",
                                           "autotinybert.high"]]
    assert "`high` -> `mid` -> `low` -> `high`" in import_graph.render(tmp_path)

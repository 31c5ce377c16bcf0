"""The command line of a tool that writes one generated documentation page (``--check``: only compare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def write_or_check(render: Callable[[], str], output: Path, tool: str, argv: list[str] | None = None) -> int:
    """Write ``render()`` to ``output``; with ``--check`` exit 1 when the file differs instead."""
    parser = argparse.ArgumentParser(description=f"write {output.relative_to(ROOT)}")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when {output.relative_to(ROOT)} is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = output.read_text(encoding="utf-8") if output.is_file() else ""
        if current != text:
            print(f"{output.relative_to(ROOT)} is out of date: run python {tool}", file=sys.stderr)
            return 1
        return 0
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output.relative_to(ROOT)}")
    return 0

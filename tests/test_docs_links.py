"""Every relative link in README.md and docs/**/*.md points at a file (or folder) of the repository,
and a link to `page.md#anchor` at a heading of that page (GitHub's anchor rule). Moved docs break
links silently otherwise; this reads the markdown only, no network."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).+?\1")
# [text](target) and ![alt](target), text possibly holding one level of brackets; an optional "title"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, file: ...


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lower-cased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen.setdefault(f"{base}-{count}", 1)
    return frozenset(seen)


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken(path: Path, repo: Path = REPO) -> list[str]:
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(repo)}:{number}: {target}"
        resolved = (path.parent / file_part).resolve() if file_part else path
        if repo not in resolved.parents and resolved != repo:
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where} (no heading with that anchor in {resolved.relative_to(repo)})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert not broken(page), "broken links:\n" + "\n".join(broken(page))


def test_the_checker_sees_links_anchors_and_skips_code(tmp_path):
    (tmp_path / "there.md").write_text("# Which clock\n\n## Forms (6 × 7, one run)\n\n## Forms (6 × 7, one run)\n",
                                       encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#which-clock) [dup](there.md#forms-6--7-one-run-1) ![img](missing.png)\n"
                    "[`code` text](there.md#no-such-heading) `[not](a-link.md)` [web](https://example.com/x)\n"
                    "```\n[inside](fenced.md)\n```\n[up](../../outside.md)\n", encoding="utf-8")
    problems = broken(page, repo=tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "missing.png", "there.md#no-such-heading", "../../outside.md"], problems

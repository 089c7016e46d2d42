"""Every relative link of README.md and of the pages under docs/ resolves: the file it names exists and, where it
names an anchor of a markdown page, a heading of that page has that anchor (GitHub's: lower case, punctuation
dropped, spaces as hyphens, ``-1``, ``-2`` for repeats). The README links to the pages that hold its detail, and
those pages link back and to one another, so a section moved or renamed breaks a link here first."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(path: Path) -> str:
    """The page without its code blocks and inline code, where ``](`` is code, not a link."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set(re.findall(r'<a (?:name|id)="([^"]+)"', path.read_text(encoding="utf-8")))
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_slugs_are_githubs():
    assert _slug("The memory allocator (Linux)") == "the-memory-allocator-linux"
    assert _slug("In transformers' `Trainer`") == "in-transformers-trainer"
    assert _slug("1. What is computed") == "1-what-is-computed"


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ]({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with that anchor")
    assert checked > 50  # the README alone links to a dozen pages
    assert not broken, "\n".join(broken)

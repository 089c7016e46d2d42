"""The fenced code blocks of README.md and the pages under docs/, for the tests that run them.

A block is the text between a line ```` ```LANG```` and the next line that is a bare ```` ``` ````. The line just
before the fence may be an HTML comment, invisible on GitHub, that says how tests/test_doc_blocks.py runs the block
(``<!-- continues the block above -->``, ``<!-- continues docs/models.md:1 -->``, ``<!-- not run: REASON -->``);
:func:`fenced` returns it with the block, :func:`code_blocks` the code alone.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_FENCE = r"(?:^<!--(?P<comment>[^\n]*?)-->[ \t]*\n)?^```{lang}[ \t]*\n(?P<code>.*?)^```[ \t]*$"


def fenced(text: str, lang: str = "python") -> list[tuple[str | None, str]]:
    """``(comment, code)`` of each ```` ```LANG```` block of ``text`` in order: ``comment`` is the stripped text of
    an HTML comment on the line just before the fence, or None."""
    pattern = re.compile(_FENCE.format(lang=re.escape(lang)), re.S | re.M)
    return [(m["comment"].strip() if m["comment"] is not None else None, m["code"]) for m in pattern.finditer(text)]


def code_blocks(page: str | Path, lang: str = "python") -> list[str]:
    """The code of each ```` ```LANG```` block of ``page`` (a path, or one relative to the repository root)."""
    return [code for _, code in fenced((ROOT / page).read_text(encoding="utf-8"), lang)]

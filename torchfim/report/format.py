"""Number formatting and markdown tables shared by the report's texts and figures."""

from __future__ import annotations

__all__ = ["fmt", "pct", "md_table"]


def fmt(x: object, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``–`` for None."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    v = float(x)  # type: ignore[arg-type]
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; ``–`` for None."""
    return "–" if x is None else f"{100 * x:.1f}%"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` (left) or ``r`` (right; default
    all but the first)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)

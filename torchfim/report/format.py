"""Number formatting and markdown tables shared by the report's texts and figures."""

from __future__ import annotations

from .wording import said

__all__ = ["fmt", "pct", "md_table", "family_text", "warning_lines"]


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


def family_text(R: dict, code: bool = False) -> str:
    """The output family of the report.json dict ``R`` (with ``code``, its name in Markdown's code font), with the
    Gaussian's σ and what it scales."""
    name, sigma = f"`{R['family']}`" if code else R["family"], R.get("sigma")
    if sigma is None:
        return name
    return (f"{name} (σ = {fmt(sigma)}: the Fisher scales as 1/σ², Var Î1 as 1/σ⁴, Var Î2 as 1/σ²; "
            f"{said('--sigma', 'family=Gaussian(sigma=σ)')} sets it)")


def warning_lines(R: dict) -> list[str]:
    """torchfim's warnings during the report (report.json's ``warnings``), one line each."""
    return [f"Warning from torchfim: {w}" for w in R.get("warnings") or []]

"""The repository passes its lint rules (``[tool.ruff]`` in pyproject.toml), and those rules are live.

ruff comes with the dev extra. Where it is missing the tests are skipped on a developer's machine
and fail under CI (``CI`` set), like the client-library tests: a missing install step must not
turn into a silently skipped check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if not os.environ.get("CI"):
        pytest.importorskip("ruff", reason="ruff is not installed: pip install -c constraints.txt -e '.[dev]'")
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
                          check=False, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_repository_passes_its_lint_rules() -> None:
    proc = _ruff(str(ROOT))
    assert proc.returncode == 0, f"ruff check found problems; fix them or say why in a noqa:\n{proc.stdout[-6000:]}"


def test_the_rules_catch_an_unused_import_a_late_bound_loop_variable_and_a_missing_comma(tmp_path: Path) -> None:
    """The configuration is the one read (not ruff's defaults) and reports what it is there for."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\n"  # F401: unused
        "\n"
        "def f():\n"
        "    fns = []\n"
        "    for i in range(3):\n"
        "        fns.append(lambda: i)\n"  # B023: every function returns 2
        "    return fns, ['a' 'b', 'c']\n"  # ISC004: two items or three?
    )
    proc = _ruff("--config", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    found = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("bad.py:")}
    assert {"F401", "B023", "ISC004"} <= found, proc.stdout

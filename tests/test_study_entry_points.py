"""``python -m torchfim.experiments.<study>`` is the command line's twin, messages included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["soen_sun", "explosion"])
def test_python_m_entry_says_a_bad_out_in_one_line(tmp_path, module):
    # Before: a traceback ending in the TorchfimError that `torchfim reproduce <study>` prints in one line.
    bad = tmp_path / "a-file.txt"
    bad.write_text("mine", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", f"torchfim.experiments.{module}", "--out", str(bad)],
                          check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--out {bad} is an existing file; choose a directory name" in proc.stderr
    assert bad.read_text(encoding="utf-8") == "mine"

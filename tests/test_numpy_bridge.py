"""A torch that cannot exchange arrays with the installed NumPy (torch 2.2's wheels beside NumPy 2) is named at import,
with the fix, rather than by torch's "Numpy is not available" wherever torchfim converts.

Oracle: torch's own failure, stood in for by a ``torch.from_numpy`` that raises as torch 2.2 does beside NumPy 2
(checked by hand there: torch 2.2.2, NumPy 2.4.6)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from torchfim._numpy_bridge import check_numpy_bridge


def test_a_broken_bridge_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(array: object) -> torch.Tensor:
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch, "from_numpy", unavailable)
    with pytest.warns(RuntimeWarning, match=r"Numpy is not available.*pip install 'numpy<2'"):
        assert not check_numpy_bridge()


def test_the_bridge_is_checked_at_import() -> None:
    code = ("import torch, warnings\n"
            "def unavailable(array):\n"
            "    raise RuntimeError('Numpy is not available')\n"
            "torch.from_numpy = unavailable\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import torchfim\n"
            "print([str(w.message) for w in caught if 'torchfim' in str(w.message)])\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.count("pip install 'numpy<2'") == 1


def test_a_working_bridge_is_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_numpy_bridge()

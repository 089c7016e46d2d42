"""What the tests of ``torchfim report`` share: a user's module of factories (``umod``) in a working directory
(the ``user_dir`` fixture), stand-in figures for tests about everything but figures (``fast_figures``), and
the files a report folder holds.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from torchfim import report as report_mod
from torchfim.report import figures as report_figures

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

USER_MODULE = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

def make_other():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)

def inputs():
    return data()[0]

class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 30
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(5, generator=g), i % 3

def dataset():
    return Pairs()

def empty():
    return torch.zeros(0, 5)

def broken():
    raise RuntimeError("no data today")

def not_a_model():
    return 42

def rows():
    return [[0.1, 0.2, 0.3, 0.4, 0.5]] * 10

def flat():
    return torch.randn(40)

def integers():
    return torch.randint(0, 5, (40, 5))

def per_input_rows():
    return [torch.randn(5) for _ in range(8)]
'''


def _stand_in_figures(R):
    names = [n for n in report_mod.FILES if n.endswith(".png")]
    if R["empirical"] is not None:
        names.append(report_mod.EMPIRICAL_FIGURE)
    return {n: PNG_MAGIC for n in names}


@pytest.fixture
def fast_figures(monkeypatch):
    """Stand-in figures (valid PNG headers, no drawing) for tests about everything but figures."""
    monkeypatch.setattr(report_figures, "draw", _stand_in_figures)


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.is_dir()]


# -------------------------------------------------------------------------------- user factories
@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "umod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("umod", None)
    yield tmp_path
    sys.modules.pop("umod", None)

"""The model the tests of bad input take by default (the ``model`` fixture): a tanh MLP of three classes."""

from __future__ import annotations

import pytest
from conftest import tanh_mlp


@pytest.fixture
def model():
    return tanh_mlp(3)

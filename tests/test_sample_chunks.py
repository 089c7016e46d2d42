"""Per-sample products built one sample at a time: every case of the shared list, every structure, against
the brute-force oracle, with the budgets of the chunks in which the rules square their per-sample products
forced down to one sample (what a rule keeps per call, such as a normalisation's ``x̂`` or the attention's
backward, is then sliced chunk by chunk; the mini-batches themselves stay whole)."""

from __future__ import annotations

import pytest
from test_engine_oracles import IDS, PAIRS, _close, _kwargs, _oracle, _view

import torchfim
from torchfim.engine import per_module
from torchfim.engine.modules import base as base_module
from torchfim.engine.modules import conv as conv_module


@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_exact_fisher_in_one_sample_chunks_equals_the_oracle(case, family, monkeypatch) -> None:
    for module, name in ((per_module, "CACHE_ELEMENTS"),
                         (base_module, "SQUARES_ELEMENTS"), (conv_module, "GRADIENT_ELEMENTS"),
                         (conv_module, "PATCH_GRADIENT_ELEMENTS")):
        monkeypatch.setattr(module, name, 1)
    res = _oracle(case, family)
    for structure in ("full", "diag", "trace", "blocks"):
        got = torchfim.fisher(res["model"], res["x"], family=family, structure=structure, backend="modules",
                              **_kwargs(case, res))
        _close(got, _view(res["exact"], structure, res["model"]), 1e-10)

"""What the engine reads of a model's outputs and mini-batches: positions with masks (a padded batch equals the
unpadded sequences; masks of the wrong shape or on a classifier), output adapters (tuples, dicts, logits
objects, classes in dim one), dict batches with labels, long outputs, and a forward taking ``use_cache``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from cases import TokenModel
from torch import nn

import torchfim


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
@pytest.mark.parametrize("estimator", ["exact", "score"])
def test_padded_batch_with_mask_equals_the_unpadded_sequences(family: str, estimator: str) -> None:
    torch.manual_seed(0)
    c = 3 if family == "categorical" else 2
    model = TokenModel(c).double()
    lengths = [4, 2, 3, 1]
    seqs = [torch.randint(1, 5, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros(padded.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        padded[i, : len(s)], mask[i, : len(s)] = s, True
    kw = {"family": family, "estimator": estimator, "structure": "diag", "n_samples": 1}
    if estimator == "exact":
        alone = torch.stack([torchfim.fisher(model, s[None], **kw) for s in seqs]).mean(0)
        together = torchfim.fisher(model, padded, mask=mask, **kw)
        assert torch.allclose(together, alone, rtol=1e-12, atol=1e-14)
    else:  # same expectation: the padded positions add nothing, so the variances agree too
        var_alone = torch.stack([torchfim.fisher_variance(model, s[None], family=family, estimator="score")
                                 for s in seqs]).sum(0) / len(seqs) ** 2
        var_together = torchfim.fisher_variance(model, padded, family=family, estimator="score", mask=mask)
        assert torch.allclose(var_together, var_alone, rtol=1e-10, atol=1e-14)


class _DictOutputs(nn.Module):
    """The token model's logits in a dict, as Hugging Face models return them in an object."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x)}


def test_planning_takes_the_mask_and_output_map_as_fisher_does() -> None:
    """``samples_needed`` and ``compare_estimators`` on a padded batch with its mask, through an output map,
    answer as on the unpadded sequences (each its own mini-batch)."""
    torch.manual_seed(0)
    model = TokenModel(3).double()
    lengths = [4, 2, 3, 1]
    seqs = [torch.randint(1, 5, (n,), generator=torch.Generator().manual_seed(i))[None] for i, n in enumerate(lengths)]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    for i, s in enumerate(seqs):
        padded[i, : s.shape[1]] = s[0]
    wrapped, logits = _DictOutputs(model), lambda out: out["logits"]
    for structure in ("trace", "diag"):
        alone = torchfim.samples_needed(model, seqs, structure=structure, rel_error=0.05)
        assert torchfim.samples_needed(wrapped, padded, structure=structure, rel_error=0.05, mask=mask,
                                       output=logits) == alone
    want = torchfim.compare_estimators(model, seqs, n_samples=2)
    got = torchfim.compare_estimators(wrapped, padded, n_samples=2, mask=mask, output=logits)
    assert [r.name for r in got.rows] == ["inner." + r.name for r in want.rows]
    for g, w in zip(got.rows, want.rows):
        for field in ("fisher_diag_sum", "score_variance", "hessian_variance"):
            assert math.isclose(getattr(g, field), getattr(w, field), rel_tol=1e-10, abs_tol=1e-15)


def test_classes_in_dim_one_as_cross_entropy_takes_them() -> None:
    torch.manual_seed(0)
    model = TokenModel(3).double()
    x = torch.randint(0, 5, (4, 3))

    class ClassFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t).transpose(1, 2)  # (B, C, T)

    want = torchfim.fisher(model, x, structure="diag")
    assert torch.allclose(torchfim.fisher(ClassFirst(), x, structure="diag", class_dim=1), want, atol=1e-14)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


def test_tuple_output_error_names_the_fix_and_output_maps_it() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(torchfim.TorchfimError, match=r"output=lambda out: out\[0\]"):
        torchfim.fisher(_Pair(), x)
    model = _Pair()
    got = torchfim.fisher(model, x, output=lambda out: out[0])
    assert torch.allclose(got, torchfim.fisher(model.lin, x))


class _Named(nn.Module):
    """Returns its outputs under another name than ``logits``: in a dict, or as an object's attribute."""

    def __init__(self, as_object: bool) -> None:
        super().__init__()
        self.lin, self.as_object = nn.Linear(3, 2).double(), as_object

    def forward(self, x: torch.Tensor) -> object:
        fields = {"count": 3, "scores": self.lin(x)}
        return SimpleNamespace(**fields) if self.as_object else fields


@pytest.mark.parametrize("as_object", [False, True])
def test_a_structured_output_error_suggests_an_output_that_works(as_object: bool) -> None:
    """The suggested ``output=`` picks the tensor by the output's own key or attribute (it said ``out[0]``, which on
    a dict raised a KeyError), and following it gives the Fisher of the tensor."""
    x = torch.randn(4, 3, dtype=torch.float64)
    model = _Named(as_object)
    with pytest.raises(torchfim.TorchfimError) as err:
        torchfim.fisher(model, x)
    hint = "out.scores" if as_object else "out['scores']"
    assert f"output=lambda out: {hint}" in str(err.value)
    output = (lambda out: out.scores) if as_object else (lambda out: out["scores"])
    assert torch.allclose(torchfim.fisher(model, x, output=output), torchfim.fisher(model.lin, x))


def test_logits_objects_and_dicts_are_read() -> None:
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)

    class WithLogits(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.lin, self.as_dict = lin, as_dict

        def forward(self, x: torch.Tensor) -> object:
            out = self.lin(x)
            return {"logits": out} if self.as_dict else type("Out", (), {"logits": out})()

    want = torchfim.fisher(lin, x)
    for as_dict in (True, False):
        assert torch.allclose(torchfim.fisher(WithLogits(as_dict), x), want)


def test_dict_batches_take_labels_as_targets() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.lin(features)

    model = Keyword()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    got = torchfim.fisher(model, [{"features": x, "labels": y}], estimator="empirical")
    assert torch.allclose(got, torchfim.fisher(model.lin, x, estimator="empirical", targets=y))


def test_mask_of_the_wrong_shape_is_refused() -> None:
    model = TokenModel(3).double()
    x = torch.randint(0, 5, (4, 3))
    with pytest.raises(torchfim.TorchfimError, match="position mask has shape.*pass one boolean per input and position"):
        torchfim.fisher(model, x, mask=torch.ones(4, 2, dtype=torch.bool))


def test_a_token_mask_on_a_classifier_is_told_to_drop_it() -> None:
    """A sequence classifier's outputs have no positions; a newcomer passed the attention mask as mask= and was told
    to pass one boolean per position. Now: drop mask= (the model reads its attention mask), the monitor too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, tokens = torch.randn(4, 3, dtype=torch.float64), torch.ones(4, 7, dtype=torch.bool)
    with pytest.raises(torchfim.TorchfimError, match=r"have no positions .* drop mask=, or pass a \(batch,\) mask"):
        torchfim.fisher(model, x, mask=tokens)
    with pytest.raises(torchfim.TorchfimError, match="drop mask="):
        torchfim.train.FisherTraceMonitor(model, x, mask=lambda batch: tokens).measure(0)


def test_long_outputs_are_refused() -> None:
    class Argmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).argmax(-1, keepdim=True)

    with pytest.raises(torchfim.TorchfimError, match="floating-point outputs"):
        torchfim.fisher(Argmax(), torch.randn(4, 3))


class _TakesUseCache(nn.Module):
    """A model whose forward takes ``use_cache``, as Hugging Face's do; it notes what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.given: list[object] = []

    def forward(self, x: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        self.given.append(use_cache)
        return self.lin(x)


def test_a_forward_taking_use_cache_runs_without_a_cache_unless_the_batch_asks() -> None:
    model = _TakesUseCache().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want = torchfim.fisher(model, x, backend="functional")
    for inputs, given in ((x, False), ({"x": x}, False), ({"x": x, "use_cache": True}, True)):
        model.given.clear()
        assert torch.allclose(torchfim.fisher(model, inputs), want, rtol=1e-12, atol=0)
        assert model.given and set(model.given) == {given}

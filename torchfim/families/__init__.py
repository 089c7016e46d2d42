"""Output families: how a network output ``o`` becomes a distribution ``p(y | o)``.

Every family here satisfies ``E_y[u] = 0`` and ``E_y[u uᵀ] = Λ(o) = E_y[−∇²_o log p(y|o)]``
for the output score ``u = ∇_o log p(y|o)``. That is what makes the Fisher information of a
network equal to ``Jᵀ Λ J``; see ``docs/math.md`` §1. For the canonical ones (categorical,
Bernoulli, Poisson, matrix Fisher: canonical-link exponential families; the Gaussian with fixed
variance, parametrised by its mean) ``−∇²_o log p`` is ``Λ`` itself, free of ``y``. The
heteroscedastic Gaussian and the gamma family are not canonical: there
``−∇²_o log p = Λ + Σ_a u_a Γ_a`` depends on ``y`` through the score, with expectation ``Λ``
(``docs/math.md`` §1.6; :class:`~torchfim.families._paired.PairedFamily`).

Shapes: outputs ``o`` are ``(B, C)``. Labels carry the batch dimension first, may
carry extra leading sample dimensions after it (``(B, k, ...)`` from
:meth:`Family.sample`) and end with the family's own label shape: ``()`` for a
class index, ``(1,)`` for a Bernoulli outcome, ``(C,)`` for Gaussian or Poisson
vectors, ``(D,)`` for the heteroscedastic Gaussian and gamma families (``C = 2D``
outputs) and ``(3, 3)`` for a matrix Fisher rotation (``C = 9``). Output scores are
returned with the labels' leading dimensions and a trailing ``C``.

Example:
    >>> import torch
    >>> from torchfim.families import get_family
    >>> fam = get_family("categorical")
    >>> o = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    >>> y = fam.sample(o, 4, torch.Generator().manual_seed(0))
    >>> y.shape, fam.output_score(y, o).shape, fam.fisher_output(o).shape
    (torch.Size([1, 4]), torch.Size([1, 4, 3]), torch.Size([1, 3, 3]))
"""

from __future__ import annotations

from ..errors import TorchfimError
from .base import Family
from .bernoulli import Bernoulli
from .categorical import Categorical
from .gamma import Gamma
from .gaussian import Gaussian
from .heteroscedastic import HeteroscedasticGaussian
from .matrix_fisher import MatrixFisher
from .poisson import Poisson
from .positions import Positions

__all__ = ["FAMILIES", "Bernoulli", "Categorical", "Family", "Gamma", "Gaussian", "HeteroscedasticGaussian",
           "MatrixFisher", "Poisson", "Positions", "get_family"]

FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (Categorical, Bernoulli, Gaussian, Poisson, HeteroscedasticGaussian, Gamma, MatrixFisher)
}


def get_family(family: str | Family) -> Family:
    """Return a :class:`Family` from its name (``"categorical"``, ``"bernoulli"``,
    ``"gaussian"`` (σ = 1; ``Gaussian(sigma=...)`` for another), ``"poisson"``,
    ``"heteroscedastic_gaussian"``, ``"gamma"``, ``"matrix_fisher"``: the keys of :data:`FAMILIES`)
    or pass an instance through.

    Example:
        >>> from torchfim.families import Gaussian, get_family
        >>> get_family("gaussian").sigma  # the name means σ = 1
        1.0
        >>> tenth = Gaussian(sigma=0.1)
        >>> get_family(tenth) is tenth
        True
    """
    if isinstance(family, Family):
        return family
    if isinstance(family, str) and family in FAMILIES:
        return FAMILIES[family]()
    listed = ", ".join(repr(n) for n in FAMILIES)
    raise TorchfimError(
        f"unknown family {family!r}; choose one of {listed} or pass a torchfim.families.Family instance"
        f"{_family_hint(family)}"
    )


#: Losses and other libraries' names for an output distribution (lower case), and torchfim's family for each.
_NAMED_ELSEWHERE = {
    **dict.fromkeys(("crossentropyloss", "cross_entropy", "ce", "nllloss", "nll_loss", "nll", "classification",
                     "classif_logits"), "categorical"),
    **dict.fromkeys(("bcewithlogitsloss", "binary_cross_entropy_with_logits", "bce_with_logits", "classif_binary_logits"),
                    "bernoulli"),
    **dict.fromkeys(("mseloss", "mse_loss", "mse", "regression"), "gaussian"),
    **dict.fromkeys(("poissonnllloss", "poisson_nll_loss"), "poisson"),
    **dict.fromkeys(("gaussiannllloss", "gaussian_nll_loss", "gaussian_nll"), "heteroscedastic_gaussian"),
}

#: Losses on probabilities, whose family takes logits instead.
_ON_PROBABILITIES = {"bceloss": "bernoulli", "binary_cross_entropy": "bernoulli", "bce": "bernoulli"}


def _family_hint(family: object) -> str:
    """What to pass instead of ``family``: an instance of a family class, or the family a loss (a module, a function
    or its name) or another library's name stands for; empty where there is nothing to say."""
    if isinstance(family, type) and issubclass(family, Family):
        return f": {family.__name__} is the class, pass an instance, e.g. {family.__name__}()"
    hint = loss_family_hint(family)
    return f": {hint}" if hint else ""


def loss_family_hint(loss: object) -> str:
    """The family to pass for ``loss`` (a loss module, function or name, or another library's name for a
    distribution), as a sentence; empty where ``loss`` is none of these."""
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    if isinstance(loss, str) and loss.lower() in FAMILIES:
        return f"family names are lower case: pass family={loss.lower()!r}"
    if name.lower() in _ON_PROBABILITIES:
        return (f"for {name}, which takes probabilities, pass family={_ON_PROBABILITIES[name.lower()]!r} with the "
                "model's logits (drop its final sigmoid, or output=torch.logit on its outputs); torchfim takes the "
                "distribution of the outputs, not a loss (docs/peers.md)")
    match = _NAMED_ELSEWHERE.get(name.lower())
    if match is None:
        return ""
    return (f"for {name} pass family={match!r} (torchfim takes the distribution of the outputs, not a loss; "
            "docs/peers.md relates each loss's curvature to torchfim's Fisher)")

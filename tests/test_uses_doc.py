"""docs/uses.md, the Fisher in downstream methods: its code runs, and each method's torchfim numbers are the
definitions' numbers.

Every ```python block of the page runs as it stands and passes its own ``assert``. Then each method is computed the
way the page computes it and compared, float64, with the same method on a brute-force Fisher: ``(1/n) Σᵢ JᵢᵀΛᵢJᵢ``
from full ``torch.func`` Jacobians of the flat trainable parameter vector (``tests/oracles.py``), with parameters
and gradients flattened by hand in ``named_parameters()`` order. The models have a frozen first layer, so a vector of
all the parameters (``parameters_to_vector``) would not line up with the results and ``layout.flatten`` must leave it
out. Where the page names a convention or an estimator as wrong (a sum over inputs where Kirkpatrick et al. and
laplace-torch take a mean or a sum, Î2 weights with negative entries), the test shows that the check it passed
rejects that alternative. laplace-torch's own ``la.H`` and posterior precision are compared where it is installed.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import clients  # first: laplace imports torchmetrics, which imports torchvision
import pytest
import torch
import torch.nn.functional as F
from doc_blocks import code_blocks
from oracles import exact_fisher
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import torchfim

DOC = Path(__file__).resolve().parents[1] / "docs" / "uses.md"
RTOL = 1e-10
N = 24
PRIOR = 2.0
P = 53  # trainable entries of _model: 30 + 5 + 15 + 3


def _python_blocks() -> list[str]:
    return code_blocks(DOC)


@functools.cache
def _run_block(index: int) -> dict:
    """Block ``index`` of the page run once in a fresh namespace, which is returned."""
    namespace: dict = {}
    exec(compile(_python_blocks()[index], f"docs/uses.md block {index + 1}", "exec"), namespace)
    return namespace


def _model(seed: int) -> nn.Module:
    """A tanh MLP whose first layer (24 + 6 entries) is frozen."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].requires_grad_(False)
    return model


def _inputs(seed: int, shift: float = 0.0) -> Tensor:
    return torch.randn(N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + shift


def _theta(model: nn.Module) -> Tensor:
    """The trainable parameters flattened by hand, the oracles' order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _split(vector: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """A vector of the trainable entries cut into parameter-shaped tensors by hand."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = vector[start : start + p.numel()].view(p.shape)
            start += p.numel()
    return out


def _rel(got: Tensor, want: Tensor) -> float:
    return clients.rel_err(got, want)


# --------------------------------------------------------------------------------------------------- the page itself
def test_page_has_one_runnable_block_per_section() -> None:
    """Six sections (the common notes and five methods), each with exactly one block, each block self-contained (its
    imports, a seed, float64) and ending with an ``assert``; the labels quoted in the prose are the first block's."""
    text = DOC.read_text()
    sections = text.split("\n## ")[1:]
    assert len(sections) == 6
    for section in sections:
        assert section.count("```python\n") == 1, section.splitlines()[0]
    for block in _python_blocks():
        assert block.startswith("import torch")
        assert "torch.manual_seed(" in block and "float64" in block
        assert block.rstrip().splitlines()[-1].startswith("assert ")
    namespace = _run_block(0)
    quoted = re.search(r"below: (\d+) against (\d+)", text)
    assert quoted is not None
    assert (namespace["k_trace"], namespace["k_diag"]) == (int(quoted[1]), int(quoted[2]))


@pytest.mark.parametrize("index", range(len(_python_blocks())), ids=lambda i: f"block{i + 1}")
def test_python_block_runs_and_passes_its_assert(index: int) -> None:
    """Each block of docs/uses.md runs in a fresh namespace without error; its last lines are ``assert``s."""
    _run_block(index)


def test_structure_helpers_share_memory_as_the_page_says() -> None:
    """The page's warning: ``as_structure(result).diag()`` of a diag result and ``to_dense()`` of a full one are the
    result's own memory, so writing into them writes into the result."""
    model, x = _model(0), _inputs(0)
    diag = torchfim.fisher(model, x, structure="diag")
    full = torchfim.fisher(model, x, structure="full")
    assert torchfim.as_structure(diag, model).diag().data_ptr() == diag.data_ptr()
    assert torchfim.as_structure(full, model).to_dense().data_ptr() == full.data_ptr()


# --------------------------------------------------------------------------------------------------------- the methods
def test_ewc_importances_are_the_mean_diagonal_of_the_oracle() -> None:
    """EWC: ``diag_by_parameter()`` is the oracle's diagonal (a mean over inputs, Kirkpatrick et al.'s) in each
    trainable parameter's shape, frozen layer left out, and the penalty from ``layout.flatten`` equals the oracle's.
    A sum over inputs would be N times off, and ``parameters_to_vector`` is longer than the results."""
    model, x = _model(1), _inputs(1)
    want = exact_fisher(model, x, "categorical").diagonal()
    result = torchfim.fisher(model, x, structure="diag")
    S = torchfim.as_structure(result, model)
    importance = S.diag_by_parameter()
    assert list(importance) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    for name, value in _split(want, model).items():
        assert importance[name].shape == value.shape
        assert _rel(importance[name], value) < RTOL
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2)))
    delta = S.layout.flatten({n: p.detach() for n, p in model.named_parameters()}) - S.layout.flatten(anchor)
    delta_by_hand = _theta(model) - torch.cat([anchor[n].reshape(-1) for n in importance])
    assert _rel(delta, delta_by_hand) < RTOL
    penalty = 50.0 * sum((importance[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters()
                         if n in importance)
    assert abs(float(penalty) / float(50.0 * (want * delta_by_hand**2).sum()) - 1) < RTOL
    assert _rel(N * want, result) > 0.5  # a sum over inputs would have been caught
    assert nn.utils.parameters_to_vector(model.parameters()).numel() == result.numel() + 30


@pytest.mark.parametrize("structure", ["full", "diag", "blocks"])
def test_laplace_precision_is_n_times_the_oracle_plus_the_prior(structure: str) -> None:
    """Laplace: ``N·fisher + prior`` is ``N·(1/N)Σ JᵀΛJ + prior`` in each structure (the blocks: the oracle's diagonal
    blocks by ``layout.span``). The mean alone plus the prior, without the factor N, is rejected."""
    model, x = _model(3), _inputs(3)
    want = N * exact_fisher(model, x, "categorical") + PRIOR * torch.eye(P, dtype=torch.float64)
    result = torchfim.fisher(model, x, structure=structure)
    S = torchfim.as_structure(result, model)
    if structure == "blocks":
        for i, name in enumerate(S.layout.names):
            span = S.layout.span(i)
            got = N * S.block(name) + PRIOR * torch.eye(S.layout.sizes[i], dtype=torch.float64)
            assert _rel(got, want[span, span]) < RTOL
        return
    got = N * S.to_dense() + PRIOR * torch.eye(P, dtype=torch.float64)
    if structure == "diag":
        want = torch.diag(want.diagonal())
    assert _rel(got, want) < RTOL
    wrong = S.to_dense() + PRIOR * torch.eye(P, dtype=torch.float64)
    assert _rel(wrong, want) > 0.5


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_laplace_torch_precision_matches(structure: str) -> None:
    """laplace-torch (curvlinops back-end, classification, all weights, frozen layer excluded by it too): ``la.H`` is
    ``N ×`` torchfim's Fisher and ``la.posterior_precision`` is ``N·F + prior``, both to rounding and both equal to
    the oracle's; its ``H`` is N times torchfim's mean, not the mean."""
    laplace = clients.need("laplace")
    from laplace.curvature import CurvlinopsGGN

    model, x = _model(4), _inputs(4)
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(4))
    with clients.default_dtype(torch.float64):
        la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                             backend=CurvlinopsGGN, prior_precision=PRIOR)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    fisher = torchfim.fisher(model, x, structure=structure)
    oracle = N * exact_fisher(model, x, "categorical")
    oracle = oracle if structure == "full" else oracle.diagonal()
    prior = PRIOR * (torch.eye(P, dtype=torch.float64) if structure == "full" else torch.ones(P, dtype=torch.float64))
    assert _rel(la.H, N * fisher) < RTOL
    assert _rel(la.posterior_precision, N * fisher + prior) < RTOL
    assert _rel(N * fisher, oracle) < RTOL
    assert _rel(la.H, fisher) > 0.5


def test_natural_gradient_steps_match_the_oracle() -> None:
    """Natural gradient, ``(F + λI)⁻¹ g``: the page's ``solve`` of a full, a diagonal and a blocks structure agrees
    with torch's dense solves on the oracle's matrix, its diagonal and its diagonal blocks, with ``g`` flattened by
    hand; ``layout.unflatten`` puts the step back in the parameters' shapes."""
    model, x = _model(5), _inputs(5)
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(5))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))))
    g_by_hand = torch.cat([grads[n].reshape(-1) for n in params])
    oracle = exact_fisher(model, x, "categorical")
    damping = 1e-2 * torch.eye(P, dtype=torch.float64)

    full = torchfim.as_structure(torchfim.fisher(model, x, structure="full"), model)
    g = full.layout.flatten(grads)
    assert _rel(g, g_by_hand) < RTOL
    step = full.solve(g, damping=1e-2)
    assert _rel(step, torch.linalg.solve(oracle + damping, g_by_hand)) < RTOL
    for name, value in _split(torch.linalg.solve(oracle + damping, g_by_hand), model).items():
        assert _rel(full.layout.unflatten(step)[name], value) < RTOL

    diag = torchfim.as_structure(torchfim.fisher(model, x, structure="diag"), model)
    assert _rel(diag.solve(g, damping=1e-2), g_by_hand / (oracle.diagonal() + 1e-2)) < RTOL

    blocks = torchfim.as_structure(torchfim.fisher(model, x, structure="blocks"), model)
    got = blocks.solve(g, damping=1e-2)
    want, start = [], 0
    for p in params.values():
        span = slice(start, start + p.numel())
        want.append(torch.linalg.solve(oracle[span, span] + damping[: p.numel(), : p.numel()], g_by_hand[span]))
        start += p.numel()
    assert _rel(got, torch.cat(want)) < RTOL
    assert _rel(got, step) > 1e-3  # the block-diagonal step is another step: the comparison can tell them apart


def _merge(fishers: list[Tensor], thetas: list[Tensor], floor: float | None) -> Tensor:
    weights = [f.clamp_min(floor) if floor is not None else f for f in fishers]
    return sum(w * t for w, t in zip(weights, thetas)) / sum(weights)


def _inside(merged: Tensor, thetas: list[Tensor]) -> bool:
    low, high = torch.minimum(*thetas), torch.maximum(*thetas)
    return bool(((merged >= low - 1e-12) & (merged <= high + 1e-12)).all())


def test_fisher_merge_matches_the_oracle_and_catches_negative_weights() -> None:
    """Fisher merging (Matena & Raffel): ``Σ F_m θ_m / Σ F_m`` from torchfim's diagonals and ``layout.flatten`` equals
    the merge from the oracle's diagonals and hand-flattened parameters, and lies between the models' entries. With
    Î2 (``estimator="hessian"``) weights, which have negative entries here, the same range check fails."""
    models, data = [_model(6), _model(7)], [_inputs(6), _inputs(7, shift=1.0)]
    fishers = [torchfim.fisher(m, x, structure="diag") for m, x in zip(models, data)]
    layout = torchfim.as_structure(fishers[0], models[0]).layout
    thetas = [layout.flatten({n: p.detach() for n, p in m.named_parameters()}) for m in models]
    merged = _merge(fishers, thetas, 1e-8)
    oracle = _merge([exact_fisher(m, x, "categorical").diagonal() for m, x in zip(models, data)],
                    [_theta(m) for m in models], 1e-8)
    assert _rel(merged, oracle) < RTOL
    assert _inside(merged, thetas)
    hessian = [torchfim.fisher(m, x, estimator="hessian", structure="diag", generator=torch.Generator().manual_seed(s))
               for s, (m, x) in enumerate(zip(models, data))]
    assert min(float(h.min()) for h in hessian) < 0
    assert not _inside(_merge(hessian, thetas, None), thetas)


def test_pruning_saliencies_match_the_oracle() -> None:
    """Pruning, ``½ F_ii θ_i²``: the saliencies from ``diag_by_parameter()`` are the oracle's, in each parameter's
    shape, and the least salient entry predicts the KL divergence of removing it. Î2's diagonal gives a negative
    saliency here, which a non-negativity check rejects."""
    model, x = _model(8), _inputs(8)
    S = torchfim.as_structure(torchfim.fisher(model, x, structure="diag"), model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    saliency = {n: 0.5 * f * params[n] ** 2 for n, f in S.diag_by_parameter().items()}
    oracle = 0.5 * exact_fisher(model, x, "categorical").diagonal() * _theta(model) ** 2
    for name, value in _split(oracle, model).items():
        assert _rel(saliency[name], value) < RTOL
    flat = S.layout.flatten(saliency)
    assert _rel(flat, oracle) < RTOL and (flat >= 0).all()
    i = int(oracle.argmin())
    before = model(x).log_softmax(-1).detach()
    with torch.no_grad():  # zero entry i of the trainable parameters, counted in the oracle's order
        start = 0
        for p in (p for p in model.parameters() if p.requires_grad):
            if start <= i < start + p.numel():
                p.view(-1)[i - start] = 0.0
            start += p.numel()
    after = model(x).log_softmax(-1).detach()
    kl = (before.exp() * (before - after)).sum(-1).mean()
    assert abs(float(kl / oracle[i]) - 1) < 0.05
    hessian = torchfim.fisher(_model(8), x, estimator="hessian", structure="diag",
                              generator=torch.Generator().manual_seed(0))
    assert float((0.5 * hessian * _theta(model) ** 2).min()) < 0

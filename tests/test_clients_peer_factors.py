"""The conversion factors of docs/peers.md that the other client tests do not run, float64, to rounding.

Each test names its row of docs/peers.md. Covered here: BackPACK's ``SumGradSquared``, ``Variance`` and
``BatchGrad`` of a ``reduction="mean"`` loss; curvlinops with ``MSELoss(reduction="mean")`` (over ``C``
outputs and on ``(N, T, C)`` outputs); laplace-torch's posterior precision with the empirical-Fisher back-ends in
regression; ASDL's ``FisherConfig``; the padded sequences (curvlinops' GGN and EF with several padded
mini-batches, mean and sum reductions; BackPACK's ``DiagGGNExact``, which counts the padded positions);
``BCEWithLogitsLoss`` in BackPACK and curvlinops; and the peers' Monte-Carlo Fishers (BackPACK's ``DiagGGNMC``,
curvlinops' ``FisherMCLinearOperator``), which are torchfim's ``estimator="score"`` in distribution on outputs
without positions: their mean over repetitions is checked against the exact Fisher within a tolerance from
``fisher_variance``, and their spread against ``fisher_variance`` itself (with positions, curvlinops' spread is
smaller).

Notation: ``n`` inputs, ``C`` outputs, ``E`` torchfim's empirical Fisher (``estimator="empirical"``), ``F`` its
exact Fisher; ``MSELoss`` is ``‖f − y‖²``, twice the unit-Gaussian negative log-likelihood.
"""

from __future__ import annotations

import copy

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import torchfim
from torchfim.families import Gaussian

backpack = clients.need("backpack")
curvlinops = clients.need("curvlinops")
laplace = clients.need("laplace")
asdl = clients.need("asdl")
from asdl import FISHER_EMP, FISHER_EXACT, FisherConfig, get_fisher_maker  # noqa: E402
from asdl.grad_maker import LOSS_CROSS_ENTROPY, LOSS_MSE  # noqa: E402
from asdl.matrices import SHAPE_DIAG, SHAPE_FULL  # noqa: E402
from backpack.extensions import BatchGrad, DiagGGNExact, DiagGGNMC, SumGradSquared, Variance  # noqa: E402
from laplace.curvature import AsdlEF, BackPackEF, CurvlinopsEF  # noqa: E402

pytestmark = [  # BackPACK's and ASDL's hooks, not torchfim's
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning"),
]

N, C, TOL = 12, 3, 1e-10
LOSSES = {"categorical": nn.CrossEntropyLoss, "gaussian": nn.MSELoss, "bernoulli": nn.BCEWithLogitsLoss}


def problem(family: str, n: int = N) -> tuple[nn.Module, Tensor, Tensor]:
    """``tanh_mlp(C)`` (51 parameters), ``n`` inputs and targets of ``family``; for ``"bernoulli"``
    ``tanh_mlp(1)`` (41 parameters), one logit per input, and float targets 0 or 1 of shape ``(n, 1)``."""
    g = torch.Generator().manual_seed(5)
    if family == "categorical":
        y = torch.randint(0, C, (n,), generator=g)
    elif family == "bernoulli":
        return tanh_mlp(1), mlp_inputs(n), torch.randint(0, 2, (n, 1), generator=g).double()
    else:
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
    return tanh_mlp(C), mlp_inputs(n), y


def empirical(model: nn.Module, x, family, y: Tensor | None = None, structure: str = "diag") -> Tensor:
    return torchfim.fisher(model, x, family=family, estimator="empirical", targets=y, structure=structure)


def eye(model: nn.Module) -> Tensor:
    return torch.eye(sum(p.numel() for p in model.parameters()), dtype=torch.float64)


def run_backpack(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor, *extensions) -> dict[str, Tensor]:
    """BackPACK on an extended copy of ``model``, one mini-batch: the gradient ``grad`` and each extension's
    quantity, flattened in parameter order (``grad_batch`` as ``(n, P)``)."""
    ext = backpack.extend(copy.deepcopy(model))
    with clients.default_dtype(torch.float64), backpack.backpack(*extensions):
        backpack.extend(loss)(ext(x), y).backward()
    params = list(ext.parameters())
    out = {"grad": torch.cat([p.grad.reshape(-1) for p in params])}
    for name in ("sum_grad_squared", "variance", "diag_ggn_exact", "diag_ggn_mc"):
        if hasattr(params[0], name):
            out[name] = torch.cat([getattr(p, name).reshape(-1) for p in params])
    if hasattr(params[0], "grad_batch"):
        out["grad_batch"] = torch.cat([p.grad_batch.reshape(len(x), -1) for p in params], dim=1)
    return out


#: (family, reduction) → the factor of BackPACK's ``SumGradSquared`` over torchfim's empirical diagonal
SUM_GRAD_SQUARED = {
    ("categorical", "sum"): N, ("categorical", "mean"): 1 / N,
    ("gaussian", "sum"): 4 * N, ("gaussian", "mean"): 4 / (N * C**2),
}


@pytest.mark.parametrize(("family", "reduction"), SUM_GRAD_SQUARED)
def test_backpack_sum_grad_squared(family: str, reduction: str) -> None:
    """peers.md, BackPACK ``SumGradSquared`` rows: ``n ×`` / ``1/n ×`` the empirical diagonal for
    ``CrossEntropyLoss`` sum / mean, ``4n ×`` / ``4/(n·C²) ×`` the Gaussian one for ``MSELoss``."""
    model, x, y = problem(family)
    got = run_backpack(model, LOSSES[family](reduction=reduction), x, y, SumGradSquared())["sum_grad_squared"]
    want = SUM_GRAD_SQUARED[family, reduction] * empirical(model, x, family, y)
    assert clients.rel_err(got, want) < TOL


@pytest.mark.parametrize(("family", "reduction"), SUM_GRAD_SQUARED)
def test_backpack_variance(family: str, reduction: str) -> None:
    """peers.md, BackPACK ``Variance`` row: ``SumGradSquared/n − (g/n)²`` with ``SumGradSquared`` from torchfim's
    empirical diagonal and ``g`` the loss's gradient; for cross-entropy ``E − (g/n)²`` (sum), ``(E − g²)/n²`` (mean)."""
    model, x, y = problem(family)
    got = run_backpack(model, LOSSES[family](reduction=reduction), x, y, Variance())
    g = got["grad"]
    e = empirical(model, x, family, y)
    want = SUM_GRAD_SQUARED[family, reduction] * e / N - (g / N) ** 2
    assert clients.rel_err(got["variance"], want) < TOL
    if family == "categorical":
        closed_form = e - (g / N) ** 2 if reduction == "sum" else (e - g**2) / N**2
        assert clients.rel_err(got["variance"], closed_form) < TOL


@pytest.mark.parametrize(("family", "scale"), [("categorical", 1 / N**2), ("gaussian", 4 / (N * C) ** 2)])
def test_backpack_batch_grad_of_mean_loss(family: str, scale: float) -> None:
    """peers.md, BackPACK ``BatchGrad`` of a ``reduction="mean"`` loss: ``(1/n) Σ gᵢgᵢᵀ`` is ``1/n²`` × the
    empirical Fisher (cross-entropy), ``1/(n·C)²`` × 4 × the Gaussian one (``MSELoss`` over ``C`` outputs)."""
    model, x, y = problem(family)
    grads = run_backpack(model, LOSSES[family](reduction="mean"), x, y, BatchGrad())["grad_batch"]
    want = scale * empirical(model, x, family, y, structure="full")
    assert clients.rel_err(grads.T @ grads / N, want) < TOL


@pytest.mark.parametrize(("operator", "estimator", "scale"), [("GGNLinearOperator", "exact", 2 / C),
                                                              ("EFLinearOperator", "empirical", 4 / C)])
def test_curvlinops_mse_mean(operator: str, estimator: str, scale: float) -> None:
    """peers.md, curvlinops ``GGNLinearOperator`` / ``EFLinearOperator`` with ``MSELoss(reduction="mean")`` over
    ``C`` outputs: ``2/C ×`` the Gaussian Fisher, ``4/C ×`` the Gaussian empirical Fisher (mini-batches 5 and 7)."""
    model, x, y = problem("gaussian")
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    op = getattr(curvlinops, operator)(model, nn.MSELoss(), list(model.parameters()), data)
    targets = y if estimator == "empirical" else None
    want = torchfim.fisher(model, x, family="gaussian", estimator=estimator, targets=targets, structure="full")
    assert clients.rel_err(op @ eye(model), scale * want) < TOL


def test_curvlinops_mse_mean_on_positions() -> None:
    """peers.md, curvlinops ``GGNLinearOperator``, ``MSELoss(reduction="mean")`` on outputs ``(N, T, C)``:
    ``2/(C·T) ×`` the Gaussian Fisher (the mean runs over ``N·T·C`` numbers; torchfim sums over positions)."""
    t = 5
    model = tanh_mlp(C)  # position-wise on (N, T, 3) inputs
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, t, 3, generator=g, dtype=torch.float64)
    y = torch.randn(N, t, C, generator=g, dtype=torch.float64)
    op = curvlinops.GGNLinearOperator(model, nn.MSELoss(), list(model.parameters()), [(x[:4], y[:4]), (x[4:], y[4:])])
    want = torchfim.fisher(model, x, family="gaussian", structure="full")
    assert clients.rel_err(op @ eye(model), 2 / (C * t) * want) < TOL


@pytest.mark.parametrize("backend", [CurvlinopsEF, BackPackEF, AsdlEF], ids=lambda b: b.__name__)
def test_laplace_empirical_posterior_precision_in_regression(backend) -> None:
    """peers.md, laplace-torch ``posterior_precision − prior_precision``, empirical-Fisher back-ends, regression:
    ``2n·σ² × fisher(family=Gaussian(sigma=σ), estimator="empirical")``, i.e. ``2n/σ²`` × the σ = 1 one."""
    sigma, prior = 0.5, 0.7
    model, x, y = problem("gaussian")
    with clients.default_dtype(torch.float64):
        la = laplace.Laplace(model, "regression", subset_of_weights="all", hessian_structure="full", backend=backend,
                             sigma_noise=sigma, prior_precision=prior)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=5))  # mini-batches of 5, 5 and 2
    got = la.posterior_precision - prior * eye(model)
    want = 2 * N * sigma**2 * empirical(model, x, Gaussian(sigma=sigma), y, structure="full")
    assert clients.rel_err(got, want) < TOL
    assert clients.rel_err(got, 2 * N / sigma**2 * empirical(model, x, "gaussian", y, structure="full")) < TOL


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backpack_bce_with_logits(reduction: str) -> None:
    """peers.md, BackPACK ``BCEWithLogitsLoss`` row (one logit per input): the ``CrossEntropyLoss`` factors with
    ``family="bernoulli"``: ``DiagGGNExact`` ``n ×`` / ``1 ×`` the diagonal, ``SumGradSquared`` ``n ×`` / ``1/n ×``
    the empirical diagonal, ``BatchGrad``'s ``(1/n) Σ gᵢgᵢᵀ`` ``1 ×`` / ``1/n² ×`` the empirical Fisher."""
    model, x, y = problem("bernoulli")
    got = run_backpack(model, nn.BCEWithLogitsLoss(reduction=reduction), x, y,
                       DiagGGNExact(), SumGradSquared(), BatchGrad())
    exact = torchfim.fisher(model, x, family="bernoulli", structure="diag")
    e = empirical(model, x, "bernoulli", y, structure="full")
    total = reduction == "sum"
    assert clients.rel_err(got["diag_ggn_exact"], (N if total else 1) * exact) < TOL
    assert clients.rel_err(got["sum_grad_squared"], (N if total else 1 / N) * e.diagonal()) < TOL
    grads = got["grad_batch"]
    assert clients.rel_err(grads.T @ grads / N, (1 if total else 1 / N**2) * e) < TOL


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("operator", "estimator"), [("GGNLinearOperator", "exact"),
                                                     ("EFLinearOperator", "empirical")])
def test_curvlinops_bce_with_logits(operator: str, estimator: str, reduction: str) -> None:
    """peers.md, curvlinops ``BCEWithLogitsLoss`` row (one logit per input): ``GGNLinearOperator`` ``n ×`` (sum) /
    ``1 ×`` (mean) ``fisher(family="bernoulli")``, ``EFLinearOperator`` the same of the empirical Fisher
    (mini-batches 5 and 7)."""
    model, x, y = problem("bernoulli")
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    op = getattr(curvlinops, operator)(model, nn.BCEWithLogitsLoss(reduction=reduction), list(model.parameters()),
                                       data)
    targets = y if estimator == "empirical" else None
    want = torchfim.fisher(model, x, family="bernoulli", estimator=estimator, targets=targets, structure="full")
    assert clients.rel_err(op @ eye(model), (N if reduction == "sum" else 1) * want) < TOL


# ---- Monte-Carlo Fishers ------------------------------------------------------------------------------------------

MC_SAMPLES, MC_REPEATS = 2, 200


def assert_score_in_distribution(draws: Tensor, model: nn.Module, x: Tensor, family: str, factor: float) -> None:
    """``draws`` (``(R, P)``, ``R`` repetitions of a peer's Monte-Carlo diagonal with ``MC_SAMPLES`` labels per input)
    are ``factor ×`` torchfim's ``fisher(estimator="score", n_samples=MC_SAMPLES)`` in distribution: their mean is
    ``factor ×`` the exact diagonal within 5 standard errors ``factor·√(V/R)`` in every entry, with ``V`` torchfim's
    ``fisher_variance``, and their variance over repetitions is ``factor²·V`` (median ratio within [0.8, 1.25]; the
    sample variance of one entry over 200 repetitions is within ±10 %, one standard deviation)."""
    exact = torchfim.fisher(model, x, family=family, structure="diag")
    v = torchfim.fisher_variance(model, x, family=family, estimator="score", structure="diag", n_samples=MC_SAMPLES)
    assert bool((v > 0).all())
    z = (draws.mean(0) - factor * exact).abs() / (factor * (v / len(draws)).sqrt())
    assert float(z.max()) < 5
    ratio = float((draws.var(0) / (factor**2 * v)).median())
    assert 0.8 < ratio < 1.25


@pytest.mark.parametrize(("family", "reduction", "factor"), [("categorical", "sum", N), ("categorical", "mean", 1),
                                                             ("gaussian", "sum", 2 * N), ("bernoulli", "mean", 1)])
def test_backpack_diag_ggn_mc_is_score_estimator(family: str, reduction: str, factor: float) -> None:
    """peers.md, BackPACK ``DiagGGNMC(mc_samples=k)`` row: the exact rows' factors (``n``, ``1``, ``2n`` for
    ``MSELoss(reduction="sum")``) times ``fisher(estimator="score", n_samples=k)``, in distribution."""
    model, x, y = problem(family)
    draws = []
    for r in range(MC_REPEATS):
        torch.manual_seed(100 + r)  # BackPACK draws from torch's global generator
        draws.append(run_backpack(model, LOSSES[family](reduction=reduction), x, y,
                                  DiagGGNMC(mc_samples=MC_SAMPLES))["diag_ggn_mc"])
    assert_score_in_distribution(torch.stack(draws), model, x, family, factor)


@pytest.mark.parametrize(("family", "reduction", "factor"), [("categorical", "sum", N), ("gaussian", "mean", 2 / C),
                                                             ("bernoulli", "sum", N)])
def test_curvlinops_fisher_mc_is_score_estimator(family: str, reduction: str, factor: float) -> None:
    """peers.md, curvlinops ``FisherMCLinearOperator(mc_samples=k)`` row: the ``GGNLinearOperator`` rows' factors
    times ``fisher(estimator="score", n_samples=k)``, in distribution (its diagonal; mini-batches 5 and 7)."""
    model, x, y = problem(family)
    data, identity = [(x[:5], y[:5]), (x[5:], y[5:])], eye(model)
    draws = [(curvlinops.FisherMCLinearOperator(model, LOSSES[family](reduction=reduction), list(model.parameters()),
                                                data, mc_samples=MC_SAMPLES, seed=r, check_deterministic=False)
              @ identity).diagonal() for r in range(MC_REPEATS)]
    assert_score_in_distribution(torch.stack(draws), model, x, family, factor)


def test_curvlinops_fisher_mc_on_positions_has_less_spread() -> None:
    """peers.md, Monte-Carlo rows, outputs with positions: curvlinops' ``FisherMCLinearOperator`` pairs each
    position's draw with itself alone (its outputs flattened to ``(N·T, C)``), so its mean is the
    ``MSELoss(reduction="mean")`` row's ``2/(C·T) ×`` the Gaussian Fisher, but its spread is below that of torchfim's
    ``estimator="score"``, whose draw for an input sums its positions' scores first (about a third of
    ``fisher_variance``, median over the entries, here)."""
    t = 5
    model = tanh_mlp(C)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, t, 3, generator=g, dtype=torch.float64)
    y = torch.randn(N, t, C, generator=g, dtype=torch.float64)
    data, identity, factor = [(x[:4], y[:4]), (x[4:], y[4:])], eye(model), 2 / (C * t)
    draws = torch.stack([(curvlinops.FisherMCLinearOperator(model, nn.MSELoss(), list(model.parameters()), data,
                                                            mc_samples=MC_SAMPLES, seed=r, check_deterministic=False)
                          @ identity).diagonal() for r in range(MC_REPEATS)])
    exact = torchfim.fisher(model, x, family="gaussian", structure="diag")
    v = torchfim.fisher_variance(model, x, family="gaussian", estimator="score", structure="diag",
                                 n_samples=MC_SAMPLES)
    assert float(((draws.mean(0) - factor * exact).abs() / (factor * (v / MC_REPEATS).sqrt())).max()) < 5
    assert float((draws.var(0) / (factor**2 * v)).median()) < 0.5


ASDL_DATA_SIZE = 40
#: (loss type, family, fisher type, torchfim estimator, factor of ASDL's Fisher over torchfim's)
ASDL_ROWS = [
    pytest.param(LOSS_CROSS_ENTROPY, "categorical", FISHER_EXACT, "exact", N / ASDL_DATA_SIZE, id="exact-ce"),
    pytest.param(LOSS_MSE, "gaussian", FISHER_EXACT, "exact", N / ASDL_DATA_SIZE, id="exact-mse"),
    pytest.param(LOSS_CROSS_ENTROPY, "categorical", FISHER_EMP, "empirical", N / ASDL_DATA_SIZE, id="emp-ce"),
    pytest.param(LOSS_MSE, "gaussian", FISHER_EMP, "empirical", 4 * N / ASDL_DATA_SIZE, id="emp-mse"),
]


@pytest.mark.parametrize(("loss_type", "family", "fisher_type", "estimator", "factor"), ASDL_ROWS)
def test_asdl_fisher(loss_type: str, family: str, fisher_type: str, estimator: str, factor: float) -> None:
    """peers.md, ASDL ``FisherConfig(fisher_type=..., loss_type=..., data_size=d)`` on a mini-batch of ``n``:
    ``n/d ×`` torchfim's exact Fisher (both losses, no 2 for MSE) or empirical Fisher (cross-entropy),
    ``4n/d ×`` the Gaussian empirical Fisher (MSE); full and diagonal shapes."""
    model, x, y = problem(family)
    config = FisherConfig(fisher_type=fisher_type, loss_type=loss_type, fisher_shapes=[SHAPE_FULL, SHAPE_DIAG],
                          data_size=ASDL_DATA_SIZE)
    maker = get_fisher_maker(model, config)
    outputs = maker.setup_model_call(model, x)
    loss = nn.functional.cross_entropy if loss_type == LOSS_CROSS_ENTROPY else nn.functional.mse_loss
    maker.setup_loss_call(loss, outputs, y)
    maker.forward_and_backward()
    full = model.fisher.data
    diag = torch.cat([torch.cat([m.fisher.diag.weight.reshape(-1), m.fisher.diag.bias.reshape(-1)])
                      for m in model if isinstance(m, nn.Linear)])
    targets = y if estimator == "empirical" else None
    want = factor * torchfim.fisher(model, x, family=family, estimator=estimator, targets=targets, structure="full")
    assert clients.rel_err(full, want) < TOL
    assert clients.rel_err(diag, want.diag()) < TOL


# ---- padded sequences -------------------------------------------------------------------------------------------

class Tagger(nn.Module):
    """A position-wise tagger, ``(N, T, 3)`` → logits ``(N, C, T)`` (38 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 5).double(), nn.Linear(5, C).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x))).transpose(1, 2)


def padded_batches(lengths: list[list[int]], seed: int = 7) -> list[tuple[Tensor, Tensor]]:
    """Mini-batches of sequences with the given observed lengths, each padded (labels -100) to its longest."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for ls in lengths:
        t = max(ls)
        x = torch.randn(len(ls), t, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (len(ls), t), generator=g)
        for i, length in enumerate(ls):
            y[i, length:] = -100
        batches.append((x, y))
    return batches


#: three mini-batches of 4 sequences with unequal mean lengths L̄_b and padded lengths T_b (6, 2, 2)
UNEVEN = [[6, 6, 6, 5], [1, 1, 2, 1], [2, 1, 1, 1]]


def curvlinops_dense(operator: str, model: nn.Module, reduction: str, data: list) -> Tensor:
    loss = nn.CrossEntropyLoss(ignore_index=-100, reduction=reduction)
    return getattr(curvlinops, operator)(model, loss, list(model.parameters()), data) @ eye(model)


def fisher_and_empirical(model: nn.Module, data: list) -> tuple[Tensor, Tensor]:
    """torchfim's exact Fisher ``F`` and ``empirical_per="position"`` Fisher ``E`` of ``data`` (``(x, y)`` pairs)."""
    f = torchfim.fisher(model, data, structure="full", class_dim=1)
    e = torchfim.fisher(model, data, estimator="empirical", empirical_per="position", structure="full", class_dim=1)
    return f, e


def test_curvlinops_padded_mean_over_mini_batches() -> None:
    """peers.md, padded sequences, curvlinops with ``reduction="mean"`` over several mini-batches: the GGN is
    ``Σ_b (B_b/N)·F_b/L̄_b``, not ``F/L̄``; the EF is ``Σ_b (B_b/N)·(B_b²·T_b/n_b²)·E_b``."""
    model, data = Tagger(), padded_batches(UNEVEN)
    n_seq = sum(len(x) for x, _ in data)
    ggn, ef = torch.zeros(2, 38, 38, dtype=torch.float64)
    for x, y in data:
        f_b, e_b = fisher_and_empirical(model, [(x, y)])
        b, t, n_obs = len(x), x.shape[1], int((y != -100).sum())
        ggn += b / n_seq * f_b * b / n_obs
        ef += b / n_seq * b**2 * t / n_obs**2 * e_b
    got_ggn = curvlinops_dense("GGNLinearOperator", model, "mean", data)
    assert clients.rel_err(got_ggn, ggn) < TOL
    assert clients.rel_err(curvlinops_dense("EFLinearOperator", model, "mean", data), ef) < TOL
    f, _ = fisher_and_empirical(model, data)
    mean_length = sum(int((y != -100).sum()) for _, y in data) / n_seq
    assert clients.rel_err(got_ggn, f / mean_length) > 0.05  # unequal L̄_b: F/L̄ is another matrix


def test_curvlinops_padded_mean_one_mini_batch() -> None:
    """peers.md, padded sequences, curvlinops with ``reduction="mean"`` on one mini-batch of ``N`` sequences padded
    to ``T`` with ``n`` observed tokens: GGN ``F/L̄``, EF ``(N·T/n)·E/L̄``; without padding ``F/T`` and ``E/T``."""
    model = Tagger()
    for lengths in ([5, 2, 4, 1, 3, 5, 2, 2], [4] * 8):
        data = padded_batches([lengths])
        f, e = fisher_and_empirical(model, data)
        n_seq, t = data[0][0].shape[:2]
        n_obs = sum(lengths)
        mean_length = n_obs / n_seq
        assert clients.rel_err(curvlinops_dense("GGNLinearOperator", model, "mean", data), f / mean_length) < TOL
        ef = curvlinops_dense("EFLinearOperator", model, "mean", data)
        assert clients.rel_err(ef, n_seq * t / n_obs * e / mean_length) < TOL
        if n_obs == n_seq * t:  # no padding
            assert clients.rel_err(ef, e / t) < TOL


def test_curvlinops_padded_sum() -> None:
    """peers.md, padded sequences, curvlinops with ``reduction="sum"``: the GGN is ``N ×`` ``fisher(...)`` and the
    EF ``N ×`` the ``empirical_per="position"`` Fisher, however the data are batched."""
    model, data = Tagger(), padded_batches(UNEVEN)
    f, e = fisher_and_empirical(model, data)
    n_seq = sum(len(x) for x, _ in data)
    assert clients.rel_err(curvlinops_dense("GGNLinearOperator", model, "sum", data), n_seq * f) < TOL
    assert clients.rel_err(curvlinops_dense("EFLinearOperator", model, "sum", data), n_seq * e) < TOL


class ConvTagger(nn.Sequential):
    """The tagger as 1×1 convolutions, ``(N, 3, T)`` → ``(N, C, T)``, which BackPACK extends (38 parameters)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Conv1d(3, 5, 1), nn.Tanh(), nn.Conv1d(5, C, 1))
        self.double()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backpack_diag_ggn_exact_counts_padded_positions(reduction: str) -> None:
    """peers.md, padded sequences, BackPACK ``DiagGGNExact`` ignores ``ignore_index``: ``N ×`` torchfim's Fisher of
    every position (``fisher(model, x, class_dim=1)``, without the labels) for ``"sum"``, that Fisher ``/T`` for
    ``"mean"``."""
    model, t = ConvTagger(), 6
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 3, t, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N, t), generator=g)
    y[::2, 3:] = -100
    got = run_backpack(model, nn.CrossEntropyLoss(reduction=reduction), x, y, DiagGGNExact())["diag_ggn_exact"]
    every_position = torchfim.fisher(model, x, structure="diag", class_dim=1)
    assert clients.rel_err(got, (N if reduction == "sum" else 1 / t) * every_position) < TOL
    observed = torchfim.fisher(model, [(x, y)], structure="diag", class_dim=1)
    assert clients.rel_err(got, (N if reduction == "sum" else 1 / t) * observed) > 0.05  # the padding counts

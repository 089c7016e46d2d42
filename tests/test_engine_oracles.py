"""Every case of tests/cases.py × family × estimator × structure × backend against brute force.

The oracle flattens each input's outputs to one vector (positions side by side), builds full
``torch.func`` Jacobians and (reverse-over-reverse) Hessians of it and the block-diagonal output Fisher of the
(unmasked) positions, and enumerates the joint label space for fourth moments: nothing of
torchfim's engine is used.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import CASES, Case, mlp_inputs, tanh_mlp, token_mask
from oracles import FAMILY_WIDTH, flat_function, joint_label_support
from torch.func import jacrev

import torchfim
from torchfim.engine.attention_kernel import math_attention

BACKENDS = ("modules", "functional")
N = 4


def oracle(case: Case, family: str) -> dict[str, torch.Tensor]:
    model = case.build(FAMILY_WIDTH[family] if family != "categorical" or case.name != "tied" else 4)
    x = case.inputs(N)
    f, theta = flat_function(model)
    with torch.no_grad():
        outs = f(theta, x)
    c = FAMILY_WIDTH[family] if case.name != "tied" else 4
    positions = outs.shape[1] // c
    mask = token_mask(x) if case.positions else torch.ones(N, positions, dtype=torch.bool)
    jac = jacrev(lambda th: f(th, x))(theta)  # (n, L·C, P)
    lam = torch.zeros(N, positions * c, positions * c, dtype=torch.float64)
    m4 = torch.zeros(N, *(positions * c,) * 4, dtype=torch.float64)
    for i in range(N):
        # Λ and the joint support of the positions' labels, enumerated (independent given the input).
        lam[i], prob, u = joint_label_support(family, outs[i], mask[i], c)  # u: (S, L·C)
        pairs = (u.unsqueeze(2) * u.unsqueeze(1)).flatten(1)  # (S, (L·C)²): u_a u_b
        m4[i] = ((pairs * prob.unsqueeze(1)).T @ pairs).reshape(m4.shape[1:])
    per_input = torch.einsum("ncp,ncd,ndq->npq", jac, lam, jac)
    res = {"exact": per_input.mean(0), "mask": mask, "model": model, "x": x}
    scale = 1.0 / N**2
    second = torch.einsum("nabcd,nap,nbp,ncq,ndq->pq", m4, jac, jac, jac, jac)
    gram = torch.einsum("nap,nbp->nab", jac, jac)
    res["var_score"] = scale * (second - (per_input**2).sum(0))
    res["var_score_trace"] = scale * (torch.einsum("nabcd,nab,ncd->", m4, gram, gram)
                                      - (torch.einsum("npp->n", per_input) ** 2).sum())
    # Reverse over reverse (no forward-mode rule of torch's enters the oracle: the one of layer_norm
    # is wrong to second order), with attention on torch's math kernel (the CPU flash kernel has
    # no double backward).
    with math_attention():
        hess = torch.stack([jacrev(jacrev(lambda th, i=i: f(th, x[i : i + 1])[0]))(theta) for i in range(N)])
    res["var_hessian"] = scale * torch.einsum("napq,nab,nbpq->pq", hess, lam, hess)
    traces = torch.einsum("naii->na", hess)
    res["var_hessian_trace"] = scale * torch.einsum("na,nab,nb->", traces, lam, traces)
    res["hessian_traces"] = {name: torch.diagonal(hess, dim1=-2, dim2=-1)[..., span].sum(-1)
                             for name, span in _spans(model).items()}  # d_t: (n, L·C)
    res["output_grams"] = {name: torch.einsum("nap,nbp->nab", jac[..., span], jac[..., span])
                           for name, span in _spans(model).items()}  # G_t: (n, L·C, L·C)
    res["output_fisher"], res["m4"] = lam, m4
    return res


def _spans(model: torch.nn.Module) -> dict[str, slice]:
    """Where each trainable parameter tensor sits in the oracle's flat θ."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = slice(start, start + p.numel())
            start += p.numel()
    return out


def _view(full: torch.Tensor, structure: str, model: torch.nn.Module):
    if structure == "full":
        return full
    if structure == "diag":
        return torch.diagonal(full)
    if structure == "trace":
        return torch.diagonal(full).sum()
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = full[start : start + p.numel(), start : start + p.numel()]
            start += p.numel()
    return out


def _close(got, want, tol: float) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            _close(got[k], want[k], tol)
        return
    scale = max(1.0, float(want.abs().max()))
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= tol * scale, float((got - want).abs().max())


PAIRS = [(case, fam) for case in CASES for fam in case.families]
IDS = [f"{c.name}-{f}" for c, f in PAIRS]
_CACHE: dict[tuple[str, str], dict] = {}


def _oracle(case: Case, family: str) -> dict:
    key = (case.name, family)
    if key not in _CACHE:
        _CACHE[key] = oracle(case, family)
    return _CACHE[key]


def _kwargs(case: Case, res: dict) -> dict:
    return {"mask": res["mask"]} if case.positions else {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_exact_every_structure(case: Case, family: str, backend: str) -> None:
    res = _oracle(case, family)
    for structure in ("full", "diag", "trace", "blocks"):
        got = torchfim.fisher(res["model"], res["x"], family=family, structure=structure, backend=backend,
                              **_kwargs(case, res))
        _close(got, _view(res["exact"], structure, res["model"]), 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_variances(case: Case, family: str, backend: str) -> None:
    res = _oracle(case, family)
    for estimator in ("score", "hessian"):
        for structure in ("diag", "trace", "blocks"):
            got = torchfim.fisher_variance(res["model"], res["x"], family=family, estimator=estimator,
                                           structure=structure, backend=backend, **_kwargs(case, res))
            want = res[f"var_{estimator}_trace"] if structure == "trace" else \
                _view(res[f"var_{estimator}"], structure, res["model"])
            _close(got, want, 1e-8)
        bound = torchfim.variance_bound(res["model"], res["x"], family=family, estimator=estimator,
                                        structure="diag", backend=backend, **_kwargs(case, res))
        exact = torch.diagonal(res[f"var_{estimator}"])
        assert bool((bound >= exact - 1e-10 * max(1.0, float(exact.abs().max()))).all())


@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_estimators_unbiased(case: Case, family: str) -> None:
    """Score and Hessian traces within 4 standard errors (closed-form, checked above) of the exact trace."""
    res = _oracle(case, family)
    k = 400
    exact = float(torch.diagonal(res["exact"]).sum())
    for estimator in ("score", "hessian"):
        est = torchfim.fisher(res["model"], res["x"], family=family, estimator=estimator, structure="trace",
                              n_samples=k, generator=torch.Generator().manual_seed(3), **_kwargs(case, res))
        se = (float(res[f"var_{estimator}_trace"]) / k) ** 0.5
        if se < 1e-12:
            assert abs(float(est) - exact) <= 1e-8 * max(1.0, abs(exact))
        else:
            assert abs(float(est) - exact) <= 4 * se, (float(est), exact, se)


POSITION_PAIRS = [(case, fam) for case, fam in PAIRS if case.positions]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,family", POSITION_PAIRS, ids=[f"{c.name}-{f}" for c, f in POSITION_PAIRS])
def test_exact_and_hessian_with_output_vectors_one_at_a_time(case: Case, family: str, backend: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs with positions pull back the exact Fisher's output vectors in blocks (a language model's
    whole set would not fit in memory): blocks of one vector give the oracle, and Î2 as in one block."""
    from torchfim.families import positions

    res = _oracle(case, family)
    kw = dict(family=family, backend=backend, **_kwargs(case, res))
    draw = dict(estimator="hessian", n_samples=3, structure="diag")
    whole = torchfim.fisher(res["model"], res["x"], generator=torch.Generator().manual_seed(5), **draw, **kw)
    monkeypatch.setattr(positions, "SQRT_BLOCK_ENTRIES", 1)
    for structure in ("full", "diag", "blocks"):
        got = torchfim.fisher(res["model"], res["x"], structure=structure, **kw)
        _close(got, _view(res["exact"], structure, res["model"]), 1e-10)
    blocked = torchfim.fisher(res["model"], res["x"], generator=torch.Generator().manual_seed(5), **draw, **kw)
    _close(blocked, whole, 1e-12)


CATEGORICAL_PAIRS = [(case, fam) for case, fam in PAIRS if fam == "categorical"]


@pytest.mark.parametrize("case,family", CATEGORICAL_PAIRS, ids=[f"{c.name}-{f}" for c, f in CATEGORICAL_PAIRS])
def test_categorical_exact_fisher_from_its_root_one_column_at_a_time(case: Case, family: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the root's block budget at one number, the categorical root is built a column at a time
    (:meth:`Categorical.fisher_output_sqrt_columns`, what a vocabulary of tens of thousands takes): the
    exact Fisher still equals the oracle."""
    from torchfim.families import base, positions

    res = _oracle(case, family)
    monkeypatch.setattr(base, "SQRT_BLOCK_ENTRIES", 1)
    monkeypatch.setattr(positions, "SQRT_BLOCK_ENTRIES", 1)
    for structure in ("full", "diag"):
        got = torchfim.fisher(res["model"], res["x"], family=family, structure=structure, backend="modules",
                              **_kwargs(case, res))
        _close(got, _view(res["exact"], structure, res["model"]), 1e-10)


def test_progress_counts_the_columns_of_a_long_exact_fisher(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With ``progress=True``, one mini-batch whose exact columns project past COLUMN_BAR_S gets a bar over
    them (the bar over mini-batches would stand still the whole time), and the Fisher is the oracle's; with
    the projection under it, or without ``progress``, no such bar."""
    from torchfim import estimators
    from torchfim.families import positions

    case = next(c for c in CASES if c.positions)
    res = _oracle(case, "categorical")
    monkeypatch.setattr(positions, "SQRT_BLOCK_ENTRIES", 1)  # one output vector per block
    for threshold, progress, shown in ((-1.0, True, True), (60.0, True, False), (-1.0, False, False)):
        monkeypatch.setattr(estimators, "COLUMN_BAR_S", threshold)
        got = torchfim.fisher(res["model"], res["x"], structure="diag", backend="modules", progress=progress,
                              **_kwargs(case, res))
        _close(got, _view(res["exact"], "diag", res["model"]), 1e-10)
        assert ("output vectors" in capsys.readouterr().err) == shown
    # The bar ends full: its total is the C − 1 vectors of each position that some input observes.
    ends = []

    class Bar(estimators.ProgressBar):
        def close(self) -> None:
            ends.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(estimators, "ProgressBar", Bar)
    monkeypatch.setattr(estimators, "COLUMN_BAR_S", -1.0)
    torchfim.fisher(res["model"], res["x"], structure="diag", progress=True, **_kwargs(case, res))
    total = int(res["mask"].any(0).sum()) * (res["model"](res["x"]).shape[-1] - 1)
    assert (total, total) in ends


def test_the_bar_counts_inputs_and_knows_their_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar counts inputs, with their number where it is known before reading them (a user trial saw "3batch"
    with no total or ETA, another a bar of 0/1 standing still over one large tensor), and ends full; a large
    mini-batch computed in groups of rows moves it once per group; a generator's, or a DataLoader that drops its
    last inputs, has no total."""
    from torch.utils.data import DataLoader

    from torchfim.engine import loop
    from torchfim.engine.per_module import PerModuleBackend

    ends, steps = [], []

    class Bar(loop.ProgressBar):
        def update(self, n: int = 1) -> None:
            steps.append(n)
            super().update(n)

        def close(self) -> None:
            if not self.disable:  # tqdm closes again when collected
                ends.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(loop, "ProgressBar", Bar)
    model, x = tanh_mlp(3), mlp_inputs(12)
    for inputs, total in ((DataLoader(x, batch_size=4), 12), ([x[:5], x[5:]], 12), ((x[:5], x[5:]), 12), (x, 12),
                          ((b for b in [x]), None), (DataLoader(x, batch_size=5, drop_last=True), None)):
        ends.clear()
        torchfim.fisher(model, inputs, structure="diag", progress=True)
        assert ends == [(total or ends[0][0], total)], (inputs, ends)
    assert ends == [(10, None)]
    monkeypatch.setattr(PerModuleBackend, "row_groups", lambda self, batch, whole: [slice(0, 5), slice(5, batch.size)])
    steps.clear()
    torchfim.fisher(model, x, structure="diag", progress=True)
    assert steps == [5, 7]


def test_a_long_exact_fisher_warns_with_its_estimate_and_names_the_score_estimator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A language model's exact Fisher pulls back about one vector per output number (tokens × vocabulary):
    where the blocks after the first project past LONG_EXACT_S, the warning gives the estimate and names
    the estimator that does not; with the projection under it, and for Î1, nothing is said."""
    from torchfim import estimators
    from torchfim.families import positions

    case = next(c for c in CASES if c.positions)
    model, x = case.build(3), case.inputs(N)
    monkeypatch.setattr(positions, "SQRT_BLOCK_ENTRIES", 1)  # one output vector per block: 3 positions × 2
    monkeypatch.setattr(estimators, "LONG_EXACT_S", -1.0)
    with pytest.warns(RuntimeWarning, match=r"6 here \(outputs \(3, 3\)\), which will take about \d+ s more.*"
                                            r"estimator='score'") as caught:
        torchfim.fisher(model, x, mask=token_mask(x))
    assert len([w for w in caught if "exact Fisher" in str(w.message)]) == 1  # once per mini-batch
    monkeypatch.setattr(estimators, "LONG_EXACT_S", 60.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torchfim.fisher(model, x, mask=token_mask(x))
        monkeypatch.setattr(estimators, "LONG_EXACT_S", -1.0)
        torchfim.fisher(model, x, estimator="score", generator=torch.Generator().manual_seed(0))

"""The peer libraries as contenders: each function computes one workload's result.

Every public function here takes the problem (model, mini-batches, labels) and returns a
*zero-argument callable* that computes the result once. Work that a user would do once per
model (``backpack.extend``, building a ``DataLoader``, copying the model) happens when the
callable is made, outside the timed region; everything a user repeats per Fisher (the passes
over the data, building curvlinops' operator, assembling the result) happens inside it.

Conventions, so that all contenders return the same quantity as torchfim (a mean over the
``n`` inputs, parameters in ``model.parameters()`` order, flattened row-major):

* BackPACK uses ``CrossEntropyLoss(reduction="sum")`` per mini-batch, accumulates over the
  mini-batches and divides by ``n`` (its ``reduction="mean"`` would scale each mini-batch by
  ``1/B`` or ``1/B²``).
* nngeometry already divides by the number of examples of its ``DataLoader``.
* curvlinops' ``GGNLinearOperator`` with ``reduction="mean"`` and ``num_data=n`` is the
  data-set mean.

Peers are imported lazily (:func:`peer_status`); a peer that fails to import, for whatever
reason (missing, or built against another torch), is reported and left out, never fatal.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

#: import name → distribution name on PyPI
PEERS = {
    "backpack": "backpack-for-pytorch",
    "nngeometry": "nngeometry",
    "curvlinops": "curvlinops-for-pytorch",
}

Runner = Callable[[], object]


def peer_status() -> dict[str, dict[str, object]]:
    """For each peer: whether it imports under this torch, its version, and the error if not."""
    status: dict[str, dict[str, object]] = {}
    for module, dist in PEERS.items():
        entry: dict[str, object] = {"distribution": dist, "available": False, "version": None, "error": None}
        try:
            entry["version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            entry["error"] = "not installed (pip install -c constraints.txt -e '.[bench]')"
            status[module] = entry
            continue
        try:
            importlib.import_module(module)
            entry["available"] = True
        except Exception as exc:  # noqa: BLE001 - any import failure leaves the peer out
            entry["error"] = f"import failed under torch {torch.__version__}: {type(exc).__name__}: {exc}"
        status[module] = entry
    return status


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- BackPACK
def _backpack_copy(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A BackPACK-extended copy of the model (``extend`` adds hooks; the original stays clean)."""
    from backpack import extend

    return extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction="sum"))


def _backpack_accumulate(model: nn.Module, loss_fn: nn.Module, batches, labels, extension, attribute: str) -> Tensor:
    from backpack import backpack

    params = _trainable(model)
    total = None
    n = 0
    for x, y in zip(batches, labels):
        for p in params:
            p.grad = None
        loss = loss_fn(model(x), y)
        with backpack(extension()):
            loss.backward()
        value = _flat([getattr(p, attribute) for p in params])
        total = value if total is None else total.add_(value)
        n += x.shape[0]
    return total / n


def backpack_diag_score(model: nn.Module, batches: list[Tensor], labels: list[Tensor]) -> Runner:
    """Σᵢ gᵢ² of the per-input gradients of −log p(ŷᵢ|xᵢ) at the given labels (``SumGradSquared``)."""
    from backpack.extensions import SumGradSquared

    ext, loss_fn = _backpack_copy(model)
    return lambda: _backpack_accumulate(ext, loss_fn, batches, labels, SumGradSquared, "sum_grad_squared")


def backpack_diag_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """``DiagGGNExact``: the exact GGN diagonal (= exact Fisher diagonal for softmax cross-entropy).

    The targets do not enter the GGN of the cross-entropy; any labels give the same result.
    """
    from backpack.extensions import DiagGGNExact

    ext, loss_fn = _backpack_copy(model)
    return lambda: _backpack_accumulate(ext, loss_fn, batches, targets, DiagGGNExact, "diag_ggn_exact")


def backpack_trace_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """Trace as the sum of ``DiagGGNExact`` (BackPACK has no cheaper exact trace)."""
    diag = backpack_diag_exact(model, batches, targets)
    return lambda: diag().sum()


def backpack_full_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """Dense GGN from ``SqrtGGNExact``: per mini-batch the factor S (C·B × P), then Σ SᵀS / n."""
    from backpack import backpack
    from backpack.extensions import SqrtGGNExact

    ext, loss_fn = _backpack_copy(model)
    params = _trainable(ext)
    num = sum(p.numel() for p in params)

    def run() -> Tensor:
        first = params[0]
        total = torch.zeros(num, num, dtype=first.dtype, device=first.device)
        n = 0
        for x, y in zip(batches, targets):
            for p in params:
                p.grad = None
            loss = loss_fn(ext(x), y)
            with backpack(SqrtGGNExact()):
                loss.backward()
            # sqrt_ggn_exact: (C, B, *param.shape) → (C·B, P)
            factor = torch.cat([p.sqrt_ggn_exact.flatten(2) for p in params], dim=2).flatten(0, 1)
            total.addmm_(factor.T, factor)
            n += x.shape[0]
        return total / n

    return run


# ------------------------------------------------------------------------- nngeometry
def _loader(batches: list[Tensor], labels: list[Tensor]):
    from torch.utils.data import DataLoader, TensorDataset

    size = batches[0].shape[0]
    if any(b.shape[0] != size for b in batches[:-1]):
        raise ValueError("nngeometry needs a DataLoader: all mini-batches but the last must have one size")
    return DataLoader(TensorDataset(torch.cat(batches), torch.cat(labels)), batch_size=size, shuffle=False)


def nngeometry_diag_score(model: nn.Module, batches: list[Tensor], labels: list[Tensor]) -> Runner:
    """``PMatDiag`` of the per-example Jacobian of ``log p(ŷᵢ|xᵢ)`` at the given labels.

    nngeometry's ``FIM_MonteCarlo`` draws its own labels (``torch.multinomial`` on the global
    RNG inside its hooks), which cannot be aligned with torchfim's; so the benchmark hands it
    the same one-output function that ``FIM_MonteCarlo(trials=1)`` builds, with torchfim's labels
    in place of its own draw. The cost is the same as ``FIM_MonteCarlo``'s (one output per input).
    """
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatDiag

    net = copy.deepcopy(model)
    loader = _loader(batches, labels)
    layers = LayerCollection.from_model(net)

    def log_prob(x: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(net(x), dim=1).gather(1, y.unsqueeze(1))

    def run() -> Tensor:
        generator = TorchHooksJacobianBackend(model=net, function=log_prob, layer_collection=layers)
        return PMatDiag(generator=generator, examples=loader).get_diag()

    return run


def _nngeometry_fim(model: nn.Module, batches, targets, representation: str):
    from nngeometry import object as nobj
    from nngeometry.metrics import FIM

    net = copy.deepcopy(model)
    loader = _loader(batches, targets)
    rep = getattr(nobj, representation)
    return lambda: FIM(net, loader, rep, variant="classif_logits")


def nngeometry_diag_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """``FIM(variant="classif_logits")`` in ``PMatDiag`` (closed-form expectation over labels)."""
    fim = _nngeometry_fim(model, batches, targets, "PMatDiag")
    return lambda: fim().get_diag()


def nngeometry_trace_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """``FIM(variant="classif_logits")`` in ``PMatDiag``, then ``.trace()``."""
    fim = _nngeometry_fim(model, batches, targets, "PMatDiag")
    return lambda: fim().trace()


def nngeometry_full_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """``FIM(variant="classif_logits")`` in ``PMatDense``."""
    fim = _nngeometry_fim(model, batches, targets, "PMatDense")
    return lambda: fim().to_torch()


# ------------------------------------------------------------------------- curvlinops
def curvlinops_full_exact(model: nn.Module, batches: list[Tensor], targets: list[Tensor]) -> Runner:
    """``GGNLinearOperator(...) @ I``: the dense GGN by P matrix–vector products.

    The operator is built inside the timed region (it is cheap with ``check_deterministic=False``
    and ``num_data`` given, the settings a user who wants speed would choose).
    """
    from curvlinops import GGNLinearOperator

    params = _trainable(model)
    data = list(zip(batches, targets))
    n = sum(x.shape[0] for x in batches)
    num = sum(p.numel() for p in params)

    def run() -> Tensor:
        op = GGNLinearOperator(
            model, nn.CrossEntropyLoss(reduction="mean"), params, data,
            check_deterministic=False, num_data=n,
        )
        eye = torch.eye(num, dtype=params[0].dtype, device=params[0].device)
        return op @ eye

    return run


#: workload kind → peer → maker; a peer missing from a kind cannot compute it exactly
MAKERS: dict[str, dict[str, Callable[..., Runner]]] = {
    "diag-score": {"backpack": backpack_diag_score, "nngeometry": nngeometry_diag_score},
    "diag-exact": {"backpack": backpack_diag_exact, "nngeometry": nngeometry_diag_exact},
    "full-exact": {
        "curvlinops": curvlinops_full_exact,
        "backpack": backpack_full_exact,
        "nngeometry": nngeometry_full_exact,
    },
    "trace-exact": {"backpack": backpack_trace_exact, "nngeometry": nngeometry_trace_exact},
}

#: why a peer is absent from a kind (for the report)
LEFT_OUT = {
    "diag-score": {
        "curvlinops": "curvlinops 3.x has no exact diagonal of any curvature operator "
        "(only the stochastic hutchinson_diag / xdiag), so the score-Fisher diagonal would take "
        "P matrix-vector products with EFLinearOperator",
    },
    "diag-exact": {
        "curvlinops": "curvlinops 3.x has no exact GGN diagonal (only hutchinson_diag / xdiag, "
        "which are stochastic)",
    },
    "trace-exact": {
        "curvlinops": "curvlinops 3.x has only stochastic trace estimators (hutchinson_trace, "
        "hutchpp_trace, xtrace); the exact trace would take P GGN-vector products",
    },
}

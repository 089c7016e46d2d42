"""Shared set-up of the tests against real client libraries (tests/test_clients_*.py).

Import this module before any client library. It does three things:

* **Hides a torchvision that cannot load.** The peers (BackPACK, nngeometry, laplace-torch) pull
  torchvision from PyPI, whose Linux wheels are built against CUDA torch; next to the CPU build of
  torch its compiled operators fail to load and ``import torchvision`` raises. transformers and
  torchmetrics (which laplace-torch imports) import torchvision whenever it is installed, so they
  would fail too. When torchvision is installed but does not import, it is marked absent
  (``sys.modules["torchvision"] = None``), which is what those libraries check. None of the tests
  uses torchvision.
* **Requires the client libraries in CI.** :func:`need` skips a test module when its library is
  missing on a developer's machine, but fails it under CI (``CI`` set), where ``.[dev]`` installs
  every client: a missing install step must not turn into silently skipped tests.
* **Brute-force oracles.** :func:`jacobians` differentiates the whole model with ``torch.func``
  against the flat parameter vector, independently of torchfim's engine; :func:`categorical_diag_by_autograd`
  takes one backward per input, position and class, for models ``torch.func`` cannot batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


def _hide_broken_torchvision() -> None:
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build next to the CPU torch: RuntimeError from its operator registry
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]  # find_spec → None, import → ImportError


_hide_broken_torchvision()


def need(module: str) -> ModuleType:
    """Import a client library: skip the test module where it is missing, fail under CI."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run a peer with ``dtype`` as torch's default dtype.

    BackPACK's pooling derivatives, nngeometry's ``FIM`` and laplace-torch's curvlinops back-end
    create work tensors with the default dtype; under float32 they fail on float64 models or round
    the result to float32. Only the peers' calls run inside this context, never torchfim's.
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def rel_err(got: Tensor, want: Tensor) -> float:
    """``max |got − want| / max |want|``: the discrepancy relative to the largest entry."""
    return float((got - want).abs().max() / want.abs().max())


def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The parameters torchfim differentiates, in its order (``named_parameters`` drops tied copies)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def jacobians(model: nn.Module, args: tuple = (), kwargs: dict | None = None,
              output: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-input Jacobians ``(B, K, P)`` of the flattened outputs ``(B, K)`` and those outputs.

    ``output="logits"`` reads the ``.logits`` field (Hugging Face models). The Jacobian is taken
    of the whole batched output against the flat parameter vector; row ``b`` depends on input
    ``b`` alone, so ``J[b]`` is input ``b``'s Jacobian.
    """
    named = trainable(model)
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = dict(model.named_buffers())
    kwargs = kwargs or {}

    def flat_output(th: Tensor) -> Tensor:
        params, start = {}, 0
        for name, p in named:
            params[name] = th[start : start + p.numel()].view(p.shape)
            start += p.numel()
        out = functional_call(model, {**buffers, **params}, args, kwargs)
        out = getattr(out, output) if output else out
        return out.reshape(out.shape[0], -1)

    with torch.no_grad():
        o = flat_output(theta)
    return jacrev(flat_output)(theta), o


def categorical_diag(jac: Tensor, logits: Tensor, classes: int, mask: Tensor | None = None) -> Tensor:
    """``(1/B) Σ_b Σ_t diag(J_btᵀ (diag p_bt − p_bt p_btᵀ) J_bt)`` over the unmasked positions ``t``.

    ``jac`` is ``(B, L·C, P)`` and ``logits`` ``(B, L·C)``, position-major; ``mask`` ``(B, L)``.
    """
    b, p_dim = jac.shape[0], jac.shape[-1]
    j = jac.reshape(b, -1, classes, p_dim)
    prob = torch.softmax(logits.reshape(b, -1, classes), -1).unsqueeze(-1)
    per_position = (prob * j.square()).sum(2) - (prob * j).sum(2).square()  # (B, L, P)
    if mask is not None:
        per_position = per_position * mask.to(per_position.dtype).unsqueeze(-1)
    return per_position.sum((0, 1)) / b


def categorical_diag_by_autograd(model: nn.Module, x: dict[str, Tensor]) -> Tensor:
    """The exact Fisher's diagonal of a Hugging Face model's ``.logits``, ``(1/n) Σᵢ Σₜ Σ_c (∂(√p_c (e_c − p)ᵀ
    oᵢₜ)/∂θ)²`` (``Λ = diag(p) − ppᵀ`` factored by class), by plain autograd, one backward per input, position
    and class (no ``torch.func``: models it cannot batch too); without a key-value cache."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    n = next(iter(x.values())).shape[0]
    use_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    for i in range(n):
        logits = model(**{k: v[i : i + 1] for k, v in x.items()}, **use_cache).logits
        logits = logits.reshape(-1, logits.shape[-1])
        probs = logits.softmax(-1).detach()
        for t in range(logits.shape[0]):
            for c in range(logits.shape[1]):
                v = (torch.eye(logits.shape[1], dtype=logits.dtype)[c] - probs[t]) * probs[t, c].sqrt()
                grads = torch.autograd.grad(logits[t] @ v, params, retain_graph=True, allow_unused=True)
                total += torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.flatten().double()
                                    for p, g in zip(params, grads)]).square()
    return total / n


def tiny_hubert() -> tuple[nn.Module, dict[str, Tensor]]:
    """Hugging Face's Hubert classifier from a tiny config (float64, eval) and three clips of 400 samples:
    a training-only spectrogram mask on the whole model and a weight-normed positional convolution."""
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.HubertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
                                       conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_labels=3,
                                       num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    model = transformers.HubertForSequenceClassification(config).double().eval()
    return model, {"input_values": torch.randn(3, 400, dtype=torch.float64)}

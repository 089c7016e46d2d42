"""The embedded default of ``torchfim report``: the demo's tanh MLP, trained briefly on the digits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import toy
from .data import Data
from .load import apply_state_dict
from .settings import DEFAULT_EPOCHS
from .wording import option, said

__all__ = ["default_model", "digits_data"]


def default_model(
    state_dict: dict | None = None,
    *,
    hidden: tuple[int, ...] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    seconds: float | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint_name: str | None = None,
) -> tuple[nn.Module, Data, dict | None]:
    """The embedded default: the demo's tanh MLP on scikit-learn's digits, and the digits.

    Without ``state_dict`` the MLP (``hidden`` widths, default the demo's 32,32) is initialised
    from ``seed`` and trained with :func:`torchfim.toy.train_classifier` for ``epochs`` epochs, all
    of them by default, so the model is the same for a seed on every run (``seconds``: a wall-clock
    limit that ends training after the first epoch past it, for a model that then depends on the
    machine's speed; ``torchfim report`` sets none). With ``state_dict`` (of that architecture, e.g. a report's ``model.pt``) the
    weights are loaded instead; one that does not fit is refused, named as ``checkpoint_name`` (the file it was read
    from, as the report's ``checkpoint``) or else as the state dict. Returns ``(model, data, training)``, ``training`` being
    :func:`torchfim.toy.train_classifier`'s summary or None.
    """
    from ..datasets import load_digits

    hidden = toy.HIDDEN if hidden is None else tuple(int(h) for h in hidden)
    X, y = load_digits()
    model = toy.mlp(X.shape[1], hidden, 10, seed=seed)
    training = None
    if state_dict is not None:
        mlp = f"the default MLP 64-{'-'.join(map(str, hidden))}-10"
        apply_state_dict(
            model, state_dict, checkpoint_name,
            f"without {option('model')} it must hold {mlp} (a report's model.pt; set {option('hidden')} to its "
            f"widths), or pass {said('--model MODULE:FACTORY for', 'model, a module of')} the architecture it was "
            "saved from" if checkpoint_name is not None else
            f"default_model takes a state dict of {mlp} (a report's model.pt): pass hidden=(...) with the "
            "widths it was saved with, or load it into the architecture it was saved from (model.load_state_dict)",
        )
    else:
        training = toy.train_classifier(
            model, X, y, epochs=epochs, seconds=seconds,
            generator=torch.Generator().manual_seed(seed), on_epoch=on_epoch,
        )
    model.eval()
    return model, digits_data(X, y), training


def digits_data(X: Tensor | None = None, y: Tensor | None = None) -> Data:
    """All 1797 digits of scikit-learn, with their labels, as report data."""
    if X is None or y is None:
        from ..datasets import load_digits

        X, y = load_digits()
    return Data(X, y, "scikit-learn digits (1797 images of 8×8 pixels scaled to [0, 1], with labels)")

"""Running the model once on a few inputs before the report's expensive part, so that a model and
data that do not fit together fail at once, with a one-line message naming the fix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import TorchfimError
from .data import Data

__all__ = ["check_model_and_data"]


def check_model_and_data(model: nn.Module, data: Data, fam, family_name: str) -> tuple[Data, str | None]:
    """Run the model on a few inputs; errors name the fix.

    Returns ``(data, note)``: the data with its targets dropped when they are not labels of the
    family (``note`` then says so), else the data unchanged and None.
    """
    # The library's own check of the model's mode (the one torchfim.fisher applies), so the
    # report refuses exactly what the library refuses: the one library internal the report uses.
    from ..engine.view import check_mode

    if not isinstance(model, nn.Module):
        raise TorchfimError(
            f"the model must be a torch.nn.Module, got {type(model).__name__}; "
            "make the --model factory return the module"
        )
    check_mode(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TorchfimError(
            "the model has no parameters with requires_grad=True, so its Fisher is empty; "
            "return a model whose parameters require gradients"
        )
    o = _outputs_on_a_few(model, data)
    try:
        fam.check_output(o)
    except TorchfimError as exc:
        raise TorchfimError(
            f"the model's outputs (shape {tuple(o.shape)}) do not fit --family {family_name}: {exc} "
            "(or pass the --family that matches the outputs: categorical, bernoulli, gaussian, poisson)"
        ) from exc
    if data.targets is not None:
        try:
            fam.check_targets(data.targets[: o.shape[0]].to(o.device), o)
        except TorchfimError as exc:
            note = (f"the data's targets are not labels of the {family_name} family ({exc}), so the empirical "
                    "Fisher was skipped")
            return Data(data.inputs, None, data.source), note
    return data, None


def _outputs_on_a_few(model: nn.Module, data: Data) -> Tensor:
    """The model's outputs on the first (up to) 8 inputs, checked to be finite; a dict of
    inputs is passed as keyword arguments, and an output's ``.logits`` read as :func:`torchfim.fisher` reads it."""
    from ..engine.view import read_logits

    first = next(p for p in model.parameters() if p.requires_grad)

    def moved(t: object) -> object:
        if not isinstance(t, Tensor):
            return t
        return t.to(device=first.device, dtype=first.dtype if t.is_floating_point() else t.dtype)

    x = data.rows(slice(0, min(8, data.n)))
    try:
        with torch.no_grad():
            o = read_logits(model(**{k: moved(v) for k, v in x.items()}) if isinstance(x, dict) else model(moved(x)))
    except Exception as exc:
        raise TorchfimError(
            f"the model could not run on the data's inputs of shape {data.input_shape()} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}); make --data return inputs the "
            "model accepts (first dimension = batch)"
        ) from exc
    if not isinstance(o, Tensor):
        raise TorchfimError(
            f"the model returned a {type(o).__name__}, not a tensor (nor an object with .logits); make "
            "forward return one (batch, outputs) tensor"
        )
    if o.is_floating_point() and not bool(torch.isfinite(o).all()):
        raise TorchfimError(
            "the model produced non-finite outputs (NaN or Inf) on the data; check the inputs for "
            "NaN/Inf and the weights (--checkpoint) for divergence"
        )
    return o

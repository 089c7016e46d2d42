"""Running the model once on a few inputs before the report's expensive part, so that a model and
data that do not fit together fail at once, with a one-line message naming the fix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._words import a_or_an, counted
from ..engine.batch import make_batch
from ..engine.labels import ModelLabels, is_encoder_decoder
from ..errors import TorchfimError
from .data import Data
from .outputs import (
    OutputLayout,
    classes_last_note,
    labelled_of,
    mask_of,
    observed_per_input,
    unmasked_padding_note,
    unobserved_inputs_note,
)
from .wording import library_words, option, said

__all__ = ["check_model_and_data", "outputs_on_a_few", "outputs_on"]


def check_model_and_data(
    model: nn.Module, data: Data, fam, family_name: str, mask: str | None = None, class_dim: int | None = None
) -> tuple[Data, str | None, OutputLayout, str | None]:
    """Run the model on a few inputs; errors name the fix.

    Returns ``(data, note, layout, beyond)``: the data with its targets dropped when they are not labels
    of the family (``note`` then says so), else the data unchanged and None; how the outputs are read
    (positions, the mask ``mask`` of the dict inputs, ``class_dim``); and, where the exact parts and the
    closed forms would not fit in memory, why (else None).
    """
    # The library's own checks of the model's mode and of class_dim (those torchfim.fisher applies),
    # so that the report refuses exactly what the library refuses.
    from ..engine.model_checks import check_mode
    from ..engine.output_reading import check_class_dim

    if not isinstance(model, nn.Module):
        raise TorchfimError(
            f"the model must be a torch.nn.Module, got {type(model).__name__}; pass the module"
        )
    check_mode(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TorchfimError(
            "the model has no parameters with requires_grad=True, so its Fisher is empty; "
            "return a model whose parameters require gradients"
        )
    o = outputs_on_a_few(model, data)
    given = check_class_dim(class_dim)
    if given == 1 and o.dim() <= 2:  # as --mask there: an option that says nothing of these outputs is refused
        raise TorchfimError(
            f"{option('class_dim', 1)}: the model's outputs {tuple(o.shape)} have no positions (one output vector per "
            f"input), so their classes have no other dim to be in; drop {option('class_dim')}"
        )
    if given == 1:
        o = o.movedim(1, -1)
    positions = tuple(o.shape[1:-1])
    keep = mask_of(data, mask, positions)
    class_dim = -1 if given is None else given  # said once in the note: the library calls get it said
    family = _family_of(fam, positions, None if keep is None else keep[: o.shape[0]])
    try:
        family.check_output(o.reshape(o.shape[0], -1) if positions else o)
    except TorchfimError as exc:
        raise _not_the_family(o, family_name, exc) from exc
    targets_note = None
    if data.targets is not None:
        try:
            _check_targets(family, data.targets[: o.shape[0]].to(o.device), o, positions)
        except TorchfimError as exc:
            targets_note = _targets_note(fam, family_name, data.targets, o, positions, exc)
            data = Data(data.inputs, None, data.source)
    beyond = _beyond_reach(model, data, fam, mask, class_dim, o, positions)
    # the positions every library call of the report observes: the mask's that the labels score
    labelled = labelled_of(model, data, fam, positions)
    observed = keep if labelled is None else labelled if keep is None else keep & labelled
    # an encoder-decoder's attention_mask is its source's, not the (decoder's) output positions'
    padding_note = mask is None and not is_encoder_decoder(model)
    notes = [unmasked_padding_note(data, positions, labelled) if padding_note else None,
             classes_last_note(o.shape) if given is None and getattr(fam, "name", None) == "categorical" else None,
             unobserved_inputs_note(observed, data.n)]
    layout = OutputLayout(positions, mask, class_dim, observed_per_input(observed, positions, data.n),
                          "; ".join(n for n in notes if n) or None)
    return data, targets_note, layout, beyond


def _not_the_family(o: Tensor, family_name: str, exc: TorchfimError) -> TorchfimError:
    """The family's refusal of the outputs in the caller's words (on the command line ``--family X``, not the
    library's ``family='X'``: :mod:`.wording`), with every family the report takes."""
    from ..families import FAMILIES

    return TorchfimError(
        f"the model's outputs (shape {tuple(o.shape)}) do not fit {option('family', family_name)}: "
        f"{library_words(str(exc))} (or "
        f"pass the {option('family')} that matches the outputs, one of {', '.join(sorted(FAMILIES))}; outputs "
        "(batch, *positions, C) are read one vector per position)")


def _beyond_reach(model: nn.Module, data: Data, fam, mask: str | None, class_dim: int, o: Tensor,
                  positions: tuple[int, ...]) -> str | None:
    """Why the full report would not fit in memory (None where it fits), said before any of it runs: its
    variances and bounds pull back every output number of an input together (a language model's
    vocabulary times its tokens). One input's pull-back is sized as the library sizes it
    (:func:`whole_output_entries`: the ``C × C`` unit vectors and ``C`` times what one vector's pull-back
    holds, from a recording of the first input), so that what passes here is not refused by the library
    after the exact parts have run; larger mini-batches the library cuts to what fits."""
    from .._memory import fits_in_memory
    from ..engine.backend import whole_output_entries

    width = o[0].numel()
    entries = whole_output_entries(width, _pulled_back_per_input(model, data, fam, mask, class_dim))
    fits, needed, free = fits_in_memory(entries, o.dtype, o.device)
    if fits:
        return None
    shape = f" ({' × '.join(map(str, positions))} positions × {o.shape[-1]:,})" if positions else ""
    return (f"this model is beyond the full report's reach: its closed-form variances pull back all {width:,} "
            f"output numbers of an input{shape} together, about {needed:.3g} GiB per input with {free:.1f} GiB "
            "available, and its exact Fisher pulls back about as many vectors per input")


def _pulled_back_per_input(model: nn.Module, data: Data, fam, mask: str | None, class_dim: int) -> int:
    """Numbers one output vector's pull-back holds for the first input, as the library's default backend
    records it (:meth:`~torchfim.engine.backend.Backend.vector_elements`)."""
    from ..engine.session import engine_pass

    with engine_pass(model, "auto", None, class_dim) as one:
        rec, _ = next(one.batches(data.given(slice(0, 1)), None, fam, mask, False, "report"))
        return one.backend.vector_elements(rec)


def _family_of(fam, positions: tuple[int, ...], keep: Tensor | None):
    """``fam``, or its product over ``positions`` (observed where ``keep``), as the library reads the outputs."""
    if not positions:
        return fam
    from ..families.positions import Positions

    return Positions(fam, positions, keep)


def _check_targets(family, y: Tensor, o: Tensor, positions: tuple[int, ...]) -> None:
    """The family's checks of the targets; a categorical target of -100 observes nothing, as in the library (an
    input's, or a position's)."""
    from ..estimators import ignored_targets

    ignored = ignored_targets(family, y)
    family.check_targets(y if ignored is None else y.masked_fill(ignored, 0), o.reshape(o.shape[0], -1))


def _targets_note(fam, family_name: str, y: Tensor, o: Tensor, positions: tuple[int, ...], exc: TorchfimError) -> str:
    """Why the data's targets ``y`` are not labels of the family (so the empirical Fisher is skipped), and the fix.
    Where their shape is the problem it is said in the data's shapes, not those of the few inputs the check ran on
    (``o``: the family's own message said "(8, 3) for outputs of shape (8, 3), got (8,)" of 40 inputs' class
    indices, and "pass one target per input", which they were); integer targets of a class index per input (or
    position) are named as such beside a family of real-valued targets, and one-hot ones beside the categorical."""
    label = tuple(fam._label_shape(o.reshape(-1, o.shape[-1])))  # one input's (one position's) label
    n, per_input = y.shape[0], tuple(y.shape[1:])
    skipped = f"are not labels of the {family_name} family"
    if _fits(per_input, label, positions):
        return f"the data's targets {skipped} ({exc}), so the empirical Fisher was skipped"
    want, categorical = (n, *positions, *label), getattr(fam, "name", None) == "categorical"
    if not categorical and not (y.is_floating_point() or y.is_complex()) and _fits(per_input, (), positions):
        fix = (f"integer targets, one per {'position' if positions else 'input'}, are class indices: pass "
               f"{option('family', 'categorical')} if the outputs are class scores, else targets of shape {want}")
    elif categorical and per_input[-1:] == (o.shape[-1],) and _fits(per_input[:-1], (), positions):
        fix = f"if they are one-hot, pass their class indices (y.argmax(-1)), of shape {want}"
    else:
        fix = f"pass targets of shape {want}, one per input in the inputs' order"
    return (f"the data's targets, of shape {tuple(y.shape)}, {skipped}, whose targets for the model's outputs "
            f"have shape {want}, so the empirical Fisher was skipped; {fix}")


def _fits(per_input: tuple[int, ...], label: tuple[int, ...], positions: tuple[int, ...]) -> bool:
    """Whether one input's targets of shape ``per_input`` hold a ``label`` per position (one, without ``positions``),
    in a shape :class:`~torchfim.families.positions.Positions` takes (``(*positions, *label)``, the positions
    flattened, a label ``(1,)`` left out)."""
    from ..families.positions import positions_fit

    if not positions:
        return per_input == label or (label == (1,) and per_input == ())
    cut = len(per_input) - len(label)
    return ((cut >= 1 and per_input[cut:] == label and positions_fit(per_input[:cut], positions))
            or (label == (1,) and len(per_input) >= 1 and positions_fit(per_input, positions)))


def outputs_on_a_few(model: nn.Module, data: Data) -> Tensor:
    """The model's outputs on the first (up to) 8 inputs, checked to be finite; a dict of
    inputs is passed as keyword arguments, and an output's ``.logits`` (or ``(batch,)`` as ``(batch, 1)``)
    read as :func:`torchfim.fisher` reads it."""
    try:
        o = outputs_on(model, data, slice(0, min(8, data.n)))
    except Exception as exc:
        raise _could_not_run(model, data, exc) from exc
    if not isinstance(o, Tensor):
        raise TorchfimError(
            f"the model returned {a_or_an(type(o).__name__)}, not a tensor (nor an object with .logits); make "
            "forward return one (batch, outputs) tensor, or "
            + said("have the --model factory return a wrapper module whose forward returns that tensor",
                   "pass a wrapper module whose forward returns that tensor")
            + " (e.g. model(x)[0])"
        )
    _check_rows(o, data)
    if o.is_floating_point() and bool((torch.isnan(o) | torch.isposinf(o)).any()):  # −Inf: the family's to judge
        raise TorchfimError(
            "the model produced non-finite outputs (NaN or +Inf) on the data; check the inputs for "
            f"NaN/Inf and the weights{said(' (--checkpoint)', '')} for divergence"
        )
    return o


def _check_rows(o: Tensor, data: Data) -> None:
    """Refuse outputs without one row per input, as the library does (1-D inputs read as one unbatched sample are
    named with their fix; the family was blamed for the outputs' shape)."""
    from ..engine.batch import Batch
    from ..engine.output_reading import check_batch_rows

    x = data.rows(slice(0, min(8, data.n)))
    size = min(8, data.n)
    out = o[:, 0] if o.dim() == 2 and o.shape[1] == 1 else o  # a (batch,) output was read as (batch, 1)
    check_batch_rows(out, Batch((), x, size) if isinstance(x, dict) else Batch((x,), {}, size))


def _could_not_run(model: nn.Module, data: Data, exc: Exception) -> TorchfimError:
    """Why the model could not run on the data, with the fix: the library's words where it knows the cause
    (integer or 1-D inputs to a float model, a layer given another shape: :func:`forward_error`), else torch's."""
    from ..engine.batch import Batch
    from ..engine.model_checks import forward_error

    x = data.rows(slice(0, min(8, data.n)))
    batch = Batch((), x, data.n) if isinstance(x, dict) else Batch((x,), {}, data.n)
    first = next(p for p in model.parameters() if p.requires_grad)
    shape = data.input_shape()
    what = (f"{counted(data.n, 'input')}, each one number (a 1-D tensor of {counted(data.n, 'value')}: the first "
            "dimension is the batch; a list of 1-D tensors is read as mini-batches of such inputs, and "
            "torch.stack(rows) makes per-input rows one (inputs, features) tensor)" if shape == []
            else f"{counted(data.n, 'input')} of shape {tuple(shape) if isinstance(shape, list) else shape}")
    known = forward_error(batch, first.dtype, exc)
    if isinstance(known, TorchfimError):
        return TorchfimError(said(f"--data gave {what}, and {known} (in the --data factory)",
                                  f"the data holds {what}, and {known}"))
    return TorchfimError(
        f"the model could not run on the data's {what} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
        f"{said('make --data return', 'pass')} inputs the model accepts (first dimension = batch)")


def outputs_on(model: nn.Module, data: Data, rows: slice, differentiable: bool = False) -> object:
    """The model's outputs on the inputs ``rows``, read as :func:`torchfim.fisher` reads them, with the forward
    torchfim differentiates (no attention fast path); with autograd where ``differentiable``."""
    from ..engine.function_forwards import attention_fast_path_off
    from ..engine.output_reading import as_columns, read_logits

    first = next((p for p in model.parameters() if p.requires_grad), None)

    def moved(t: object) -> object:
        if not isinstance(t, Tensor) or first is None:
            return t
        return t.to(device=first.device, dtype=first.dtype if t.is_floating_point() else t.dtype)

    x = data.rows(rows)
    if isinstance(x, dict):  # an encoder-decoder's decoder reads the inputs it builds from the labels, as in the library
        x = make_batch(data.given(rows), None, None, None, labels=ModelLabels(model)).kwargs
    with torch.set_grad_enabled(differentiable), attention_fast_path_off():  # no nested tensors
        return as_columns(read_logits(model(**{k: moved(v) for k, v in x.items()}) if isinstance(x, dict)
                                      else model(moved(x))))

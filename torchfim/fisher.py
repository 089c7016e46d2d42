"""``torchfim.fisher``: the Fisher information of a model and its estimators.

For inputs ``x_1..x_n`` (fixed) with per-sample Jacobians ``Jᵢ = ∂o(xᵢ)/∂θ`` and output Fishers
``Λᵢ = Λ(o(xᵢ))`` (see :mod:`torchfim.families`), with ``k = n_samples`` labels
``y_ij ~ p(·|xᵢ)`` per input and output scores ``u_ij = ∇_o log p(y_ij|o(xᵢ))``:

* ``exact``     ``I = (1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ``  (closed-form expectation over labels)
* ``score``     Î1 ``= (1/(nk)) Σᵢⱼ Jᵢᵀ u_ij u_ijᵀ Jᵢ``
* ``hessian``   Î2 ``= (1/(nk)) Σᵢⱼ [Jᵢᵀ Λᵢ Jᵢ − Σ_a u_ij,a ∇²_θ o_a(xᵢ)]``
* ``empirical`` ``(1/n) Σᵢ Jᵢᵀ uᵢ uᵢᵀ Jᵢ`` with the true targets ``yᵢ`` (biased); with
  ``empirical_per="position"``, ``(1/n) Σᵢ Σₜ J_{it}ᵀ u_{it} u_{it}ᵀ J_{it}`` for outputs with positions
* ``combined``  ``w·Î1 + (1 − w)·Î2`` with Î1 and Î2 from the same labels and, per entry (for
  ``trace``: for the trace), ``w = (V2 − C12)/(V1 + V2 − 2C12)``, the weight that minimises the
  variance given the closed-form ``V1 = Var Î1``, ``V2 = Var Î2`` and ``C12 = Cov(Î1, Î2)``
  (docs/math.md §8; :mod:`torchfim.combined`)

Î1, Î2 and the combined estimator are unbiased for ``I``. All are means over inputs (and labels);
an output with positions sums over its (unmasked) positions (docs/math.md §2 and §5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn

from ._batches import Inputs
from ._processes import announced
from ._settings_digest import family_settings
from .combined import combined_terms
from .engine import backend_name, check_finite_result
from .engine.session import engine_pass
from .engine.view import Mask
from .errors import TorchfimError, check_choice, check_generator, check_n_samples, warn_user
from .estimators import ESTIMATORS, add_estimate
from .families import Family, get_family
from .keyword_hints import explains_keywords
from .process_rows import FAILED_BEFORE, RowShare, row_share
from .structures import STRUCTURE_NAMES, PublicValue, entrywise, make_structure, structure_kind
from .variance import EstimateVariance

STRUCTURES = STRUCTURE_NAMES
FisherResult = PublicValue


@announced(FAILED_BEFORE)
@explains_keywords
def fisher(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "exact",
    structure: str = "diag",
    n_samples: int = 1,
    targets: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    return_stderr: bool = False,
    backend: str = "auto",
    method: str | None = None,
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
    across_processes: bool = False,
    empirical_per: str = "input",
) -> FisherResult | tuple[FisherResult, FisherResult]:
    """Fisher information of ``model`` over ``inputs`` under its own predictive distribution.

    Computes the data-set FIM ``I = (1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` (``estimator="exact"``) or one of its
    estimators (``"score"`` = Î1, ``"hessian"`` = Î2, ``"empirical"`` with true targets,
    ``"combined"`` = the variance-minimising ``w·Î1 + (1 − w)·Î2`` from shared labels); see the
    module docstring for the formulas. Means over inputs and over the ``n_samples`` labels drawn
    per input; sums over the positions of an output with positions.

    Args:
        model: any ``nn.Module`` that treats samples independently (call ``model.eval()`` for
            BatchNorm or Dropout). θ = its ``requires_grad`` parameters in
            ``model.parameters()`` order. Outputs: ``(B, C)``, or ``(B, *positions, C)`` where each
            position is an independent observation (a language model's tokens).
        inputs: a tensor whose first dimension is the batch, a dict of keyword inputs, or an
            iterable of mini-batches (tensors, dicts, or ``(inputs, targets)`` pairs, e.g. a
            DataLoader; a tuple of two tensors with as many rows is refused as ambiguous: ``[(x, y)]`` is one
            pair, ``[x1, x2]`` two mini-batches). A dict's ``labels``/``label``/``targets`` entry is taken as targets; for a
            Hugging Face causal language model (whose own loss shifts its ``labels``), the outputs at
            position t get ``labels[t + 1]``, as in that loss.
        family: output family name or :class:`~torchfim.families.Family`.
        estimator: ``"exact"``, ``"score"``, ``"hessian"``, ``"empirical"`` or ``"combined"``. ``hessian``'s
            entries (and ``combined``'s) can be negative, one label's Hessian not being positive semi-definite:
            weights that must be non-negative (EWC, merging, pruning saliencies) take ``exact`` or ``score``.
        structure: ``"full"`` (P×P), ``"diag"`` (P), ``"trace"`` (0-dim) or ``"blocks"`` (dict:
            parameter name → its diagonal block; ``"layers"`` is the old name).
        n_samples: labels drawn per input (per position) for ``score``, ``hessian`` and ``combined``.
        targets: true targets, required by ``empirical`` (or carried by the batches). A categorical
            target of -100 (``F.cross_entropy``'s ``ignore_index``) observes nothing: no score.
            Targets given here or as ``(inputs, targets)`` pairs are read as given, one per output
            position (a causal language model's are not shifted, unlike a dict batch's ``labels``).
        generator: ``torch.Generator`` for label sampling (global RNG when None).
        return_stderr: also return the standard error of each entry, the square root of
            :func:`torchfim.fisher_variance` (closed form, conditional on the inputs), summed in the estimate's own
            pass over the inputs, a mini-batch at a time (none is held: a loader is read once). ``exact`` has
            none; ``empirical`` has no label randomness given the targets: both get zeros (for ``empirical``
            with a warning: its error is a bias that no standard error shows). A standard error, not an
            interval: ±1.96 s.e. covers 95% only where the estimate is close to normal (many inputs and
            labels); with a few or heavy-tailed inputs it is skewed and covers less (docs/accuracy.md, "What a
            standard error covers").
            ``combined``: ``√(w²V1 + (1 − w)²V2 + 2w(1 − w)C12)``, the square root of
            :func:`torchfim.combined.combined_variance`. The closed form pulls back every output number of
            each input, as the exact Fisher does: about ``C`` backward passes per input for ``C`` outputs, tens of
            times the score estimate itself. Tr(F) with an error bar at the score estimator's cost comes from
            :func:`torchfim.score_norms.squared_score_norms` with ``n_samples ≥ 2`` (the spread of the labels).
        backend: ``"auto"``/``"modules"`` (per-module rules, with a generic rule for modules
            without one) or ``"functional"`` (the whole model through ``torch.func``, the
            reference). Both give the same result where both run the model; ``"functional"`` refuses what
            ``torch.func`` cannot batch as a whole (``nn.PReLU`` and ``nn.RReLU`` in torch 2.13, packed sequences,
            forwards that read data-dependent lengths), which ``"auto"`` computes one module at a time.
        method: deprecated name of ``backend`` (``"layers"`` means ``"modules"``).
        progress: show a progress bar over the inputs (moved as each mini-batch, or group of a large one, is done).
        mask: drops positions (padding): a boolean tensor ``(n, *positions)`` aligned with tensor
            inputs, a function of a mini-batch's inputs returning ``(B, *positions)``, or the key of
            a dict batch (e.g. ``"attention_mask"``). True = observed.
        output: maps the model's raw output to the output tensor (e.g. ``lambda out: out[0]``);
            objects with ``.logits`` and dicts with ``"logits"`` are read without it.
        class_dim: ``-1`` when the class (output) dimension is last; ``1`` for outputs
            ``(B, C, *positions)`` as ``torch.nn.functional.cross_entropy`` takes them (a segmentation
            model's logits). None (default): last, with a one-time warning on outputs with two or more
            position dims, where torch's convention puts the classes in dim 1.
        across_processes: compute together with the other processes of a ``torch.distributed`` run, each on
            its share of every mini-batch (every process passes the same inputs and gets the same result, the
            Fisher of them all, for about ``1/W`` of the work): :mod:`torchfim.process_rows`. Refused with
            ``estimator="combined"`` (compute it on one process). Every process must make the call at the same point, not under
            ``if rank == 0:``: one that calls alone waits for the others in a collective until the process group's
            timeout (or until they leave the run), then, under gloo, raises an error that says so; a call
            refused on some processes only (an argument chosen by rank) is refused there and named on the others.
            Each process draws the labels of its own rows, so a generator's seed gives other labels, and another
            estimate of the same distribution, for another number of processes.
        empirical_per: the observation of ``estimator="empirical"`` on outputs with positions. ``"input"``
            (default): each input's score summed over its positions, ``(1/n) Σᵢ gᵢgᵢᵀ`` with
            ``gᵢ = Σₜ J_{it}ᵀu_{it}``, which keeps the cross-position terms. ``"position"``: each position's
            own, ``(1/n) Σᵢ Σₜ J_{it}ᵀu_{it}u_{it}ᵀJ_{it}``, the empirical Fisher of tokens as the peers
            compute it: curvlinops' ``EFLinearOperator`` of a summed loss is ``n`` times it. With a mean loss and
            labels padded with -100 it is not this divided by the mean number of observed positions: curvlinops
            counts the padded entries in the mean, per mini-batch (docs/peers.md gives the factor). It pulls back
            one vector per input for every position some input of the mini-batch observes (an input's masked or
            -100 positions are zero vectors): about the exact Fisher's cost over ``C − 1``, several times
            ``"input"``'s. The same where the outputs have no positions.

    Returns:
        The requested structure, on the model's device in the model's dtype (its first trainable
        parameter's, where it has several; accumulated in float32 or wider); with
        ``return_stderr=True`` a pair ``(estimate, stderr)``.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(32, 4)
        >>> torchfim.fisher(model, x, structure="trace").shape
        torch.Size([])
        >>> F = torchfim.fisher(model, x, estimator="score", structure="diag", n_samples=4,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> F.shape
        torch.Size([67])
    """
    fam = get_family(family)
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("structure", structure, STRUCTURES)
    k = check_n_samples(n_samples)
    check_generator(generator)
    name = backend_name(backend, method)
    per_position = _per_position(empirical_per, estimator)
    if estimator == "empirical" and targets is None and isinstance(inputs, Tensor):
        raise TorchfimError(
            "estimator='empirical' uses the true labels: pass targets=... (one per input), "
            "or use estimator='exact' for the Fisher under the model's own distribution"
        )
    _warn_unused(estimator, targets, k, return_stderr)
    draws = estimator in ("score", "hessian")
    share = _row_share(across_processes, estimator, mask, output,
                       ("fisher", estimator, structure_kind(structure), family_settings(fam), k if draws else None,
                        bool(return_stderr), class_dim, per_position))
    if estimator == "combined":
        combined = combined_terms(model, inputs, fam, structure, k, draw=True, targets=targets, generator=generator,
                                  backend=name, progress=progress, mask=whole_data_mask(mask, inputs), output=output,
                                  class_dim=class_dim)
        if not return_stderr:
            return combined.estimate
        return combined.estimate, entrywise(lambda v, e: v.sqrt().to(e.dtype), combined.variance, combined.estimate)

    def compute() -> tuple[FisherResult, FisherResult | None, int]:
        """This process's estimate over its inputs (its rows of them, shared), their number, and with
        ``return_stderr`` the estimate's variance."""
        with engine_pass(model, name, output, class_dim) as one:
            drawing = generator if share is None or not draws else share.generator(generator, one.view.device)
            result = make_structure(structure, one.view.layout)
            batch_mask = whole_data_mask(mask, inputs)
            # The standard error's per-input terms, summed in this same pass: no mini-batch is held for a second one.
            spread = EstimateVariance(one, fam, estimator, structure, k, batch_mask) if return_stderr and draws else None
            # The exact Fisher pulls back many vectors and draws nothing: large mini-batches go in row groups.
            for rec, fam_b in one.batches(inputs, targets, fam, batch_mask, progress, f"fisher[{estimator}]",
                                          split=estimator == "exact" or per_position,
                                          rows=None if share is None else share.rows):
                add = partial(add_estimate, estimator, one.backend, rec, fam_b, result, k, drawing, progress,
                              per_position)
                if spread is None:
                    add()
                else:
                    spread.add(rec, fam_b, add)
            if share is not None:
                share.probe(one.view)
            estimate = result.finish(max(one.n, 1))
            check_finite_result(estimate, f"the {estimator} Fisher", one.view.dtype)
            if spread is None or one.n == 0:  # no labels drawn (or no rows of this process): no spread
                return estimate, entrywise(torch.zeros_like, estimate) if return_stderr else None, one.n
            return estimate, spread.finish(one.n), one.n

    estimate, variance, n = compute() if share is None else share.together(compute, model)
    if share is not None:
        estimate, variance = share.mean(estimate, variance, n, model)
    # A half-precision model's variances come in float32 (torchfim.variance.squares_layout); its standard errors,
    # of the Fisher's scale, in the estimate's dtype.
    return (estimate, entrywise(lambda v, e: v.clamp_min(0).sqrt().to(e.dtype), variance, estimate)) \
        if return_stderr else estimate


def _per_position(empirical_per: object, estimator: str) -> bool:
    """Whether the empirical Fisher is per position (``empirical_per="position"``), refused for other estimators."""
    check_choice("empirical_per", empirical_per, ("input", "position"))
    if empirical_per == "position" and estimator != "empirical":
        raise TorchfimError(
            f"empirical_per='position' chooses the observation of estimator='empirical' (each position's true label "
            f"alone); estimator={estimator!r} takes its labels from the model, where the positions' cross terms vanish "
            "in expectation: leave empirical_per out, or pass estimator='empirical'"
        )
    return empirical_per == "position"


def _row_share(across_processes: object, estimator: str, mask: Mask, output: object, call: tuple) -> RowShare | None:
    """This process's share of the rows for ``across_processes=True`` (:mod:`.process_rows`), else None."""
    share = row_share(across_processes, mask, call, output)
    if share is not None and estimator == "combined":
        raise TorchfimError("across_processes=True is not available for estimator='combined'; use 'score' or "
                            "'hessian' (each with its standard error), or compute it in one process")
    return share


def whole_data_mask(mask: Mask, inputs: object) -> Mask:
    """A mask tensor for the whole data set becomes a function of each mini-batch's rows."""
    if not isinstance(mask, Tensor):
        return mask
    if not isinstance(inputs, (Tensor, Mapping)):
        raise TorchfimError(
            "mask is one tensor but inputs come in several mini-batches; a tensor mask goes with inputs given as "
            "one tensor or one dict mini-batch. Pass mask as a function of a mini-batch (e.g. mask=lambda x: "
            "x != pad_id) or as the key of dict mini-batches (e.g. mask='attention_mask')"
        )
    return mask


def _warn_unused(estimator: str, targets: object, k: int, return_stderr: bool) -> None:
    """Warn where an argument given explicitly does not enter ``estimator``: ``targets=`` anywhere but the
    empirical Fisher (the others use the model's own distribution), ``n_samples`` where no label is drawn; and
    where the empirical Fisher's standard errors, all 0, would read as an exact result."""
    if return_stderr and estimator == "empirical":
        warn_user("torchfim: the empirical Fisher draws no labels, so its standard errors are 0; they say nothing of "
                  "its bias, its distance to the Fisher (docs/what-fisher-is-not.md). estimator='score' estimates "
                  "the Fisher itself with an error bar")
    if targets is not None and estimator != "empirical":
        warn_user(
            f"torchfim: targets= is read only by estimator='empirical'; estimator={estimator!r} uses the model's "
            "own predictive distribution and ignores their values (a class label -100 still leaves its position out, "
            "as in the loss; pass estimator='empirical' for the Fisher at these labels)"
        )
    if k != 1 and estimator in ("exact", "empirical"):
        warn_user(f"torchfim: n_samples={k} is ignored by estimator={estimator!r}, which draws no labels")

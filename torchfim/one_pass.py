"""The exact Fisher and closed-form variances of one data set, summed in one pass over its mini-batches.

:func:`torchfim.samples_needed` takes the exact Fisher and the variance ``V₁`` with one label;
:func:`torchfim.compare_estimators` the exact diagonal and the variances of Î1 and Î2. Each is a sum of per-input
terms, ``F = (1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` and ``V = (1/(n²k)) Σᵢ vᵢ`` (docs/math.md §3; the combined estimator's three
variances too, its weight taken from their sums at the end), and no term reads another input or a sum over the
inputs. So one pass adds every part's terms of a mini-batch as the loop reaches it and holds none: a loader or a
one-shot generator is read once, and memory does not grow with the number of its mini-batches (they were copied
and all kept, for one pass per part).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._batches import Inputs
from ._processes import gather_numbers
from ._settings_digest import family_settings
from ._words import counted
from .combined import SharedLabelSums
from .engine import Recording, backend_name, check_finite_result
from .engine.backend import NoForwardDerivative, is_trace
from .engine.session import Pass, engine_pass
from .engine.view import Mask
from .estimators import add_estimate
from .families import Family, get_family
from .fisher import whole_data_mask
from .process_rows import row_share
from .structures import PublicValue, entrywise, make_structure, structure_kind
from .variance import add_variance_terms, squares_layout

#: The parts a pass can sum: the exact Fisher, the variances of Î1 and Î2, the combined estimator's variance.
PARTS = ("exact", "score", "hessian", "combined")


class _Sums:
    """Running sums of ``parts`` over the mini-batches of one pass (``optional``: parts whose
    :class:`~torchfim.engine.backend.NoForwardDerivative` leaves them out, as NaN, instead of raising)."""

    def __init__(self, one: Pass, structure: str, parts: tuple[str, ...], k: int, optional: tuple[str, ...]) -> None:
        self.one, self.parts, self.k, self.optional = one, parts, k, optional
        layout, squares = one.view.layout, squares_layout(one.view.layout)
        self.sums = {name: SharedLabelSums(structure, one.view, draw=False) if name == "combined" else
                     make_structure(structure, layout if name == "exact" else squares) for name in parts}
        self.unavailable: dict[str, str] = {}
        # The loop's row groups: those of the closed forms, which pull back all output numbers of an input together
        # where the score's variance is among them (the exact Fisher's own groups are never smaller).
        self.whole = "score" in parts or "combined" in parts
        first = self.sums[parts[0]]
        self.grams = first.grams if isinstance(first, SharedLabelSums) else is_trace(first)  # an output gram each

    def add(self, rec: Recording, fam: Family, progress: bool) -> None:
        """Add the terms of ``rec``'s inputs to every part, in the order of :attr:`parts` (the exact Fisher's one
        pull-back per output number after a closed form: where an input's Jacobian would not fit, the closed form
        refuses at once)."""
        backend = self.one.backend
        for name in self.parts:
            if name in self.unavailable:
                continue
            if name == "exact":
                add_estimate("exact", backend, rec, fam, self.sums[name], 1, None, progress)
            elif name == "combined":
                self.sums[name].add(backend, rec, fam, self.k, None)
            else:
                try:
                    add_variance_terms(backend, rec, fam, self.sums[name], name, "exact")
                except NoForwardDerivative as err:
                    if name not in self.optional:
                        raise
                    self.unavailable[name] = str(err)

    def finish(self, n: int) -> dict[str, PublicValue]:
        """Each part over ``n`` inputs: the Fisher's sums over ``n``, the variances' over ``n²k``; checked finite."""
        done: dict[str, PublicValue] = {}
        squares = squares_layout(self.one.view.layout).dtype
        for name, sums in self.sums.items():
            if name == "exact":
                done[name] = sums.finish(max(n, 1))
                check_finite_result(done[name], "the exact Fisher", self.one.view.dtype)
            elif name == "combined":
                done[name] = sums.finish(self.k).variance
                check_finite_result(done[name], "the combined estimator's variance", squares)
            elif name in self.unavailable:
                done[name] = entrywise(lambda t: torch.full_like(t, math.nan), sums.finish(max(n, 1) ** 2 * self.k))
            else:
                done[name] = sums.finish(max(n, 1) ** 2 * self.k)
                check_finite_result(done[name], f"the variance of the {name} estimator", squares)
        return done


def summed_parts(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family,
    structure: str,
    parts: tuple[str, ...],
    k: int,
    *,
    what: str,
    optional: tuple[str, ...] = (),
    backend: str = "auto",
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
    across_processes: bool = False,
) -> tuple[dict[str, PublicValue], str | None]:
    """``parts`` (of :data:`PARTS`) of ``inputs`` from one pass: the exact Fisher in ``structure`` as
    :func:`torchfim.fisher` gives it, the variances with ``k`` labels per input as :func:`torchfim.fisher_variance`
    and :func:`torchfim.combined.combined_variance` give them; and why a part of ``optional`` could not be computed
    (the model has no forward-mode derivative for Î2; that part is then NaN), else None. ``what``: the public call,
    for the messages; the other arguments as in :func:`torchfim.fisher`. With ``across_processes`` (not with
    ``"combined"``), each process sums its rows' terms and the parts combine as the two functions' do: the Fisher
    as ``Σ_r (n_r/N) F_r``, each variance as ``Σ_r (n_r/N)² V_r``."""
    fam, backend = get_family(family), backend_name(backend, None)
    share = row_share(across_processes, mask, (what, parts, optional, structure_kind(structure), family_settings(fam), k,
                                               class_dim), output, what)
    mask = whole_data_mask(mask, inputs)

    unavailable: list[str] = []  # kept out of compute's result, whose shapes every process must share

    def compute() -> tuple[dict[str, PublicValue], int]:
        with engine_pass(model, backend, output, class_dim) as one:
            sums = _Sums(one, structure, parts, k, optional)
            # Closed forms pull every output vector back and draw nothing: large mini-batches go in row groups.
            for rec, fam_b in one.batches(inputs, None, fam, mask, progress, what, split=True, whole=sums.whole,
                                          grams=sums.grams, rows=None if share is None else share.rows):
                sums.add(rec, fam_b, progress)
            if share is not None:
                share.probe(one.view)
            unavailable.extend(sums.unavailable.values())
            return sums.finish(one.n), one.n

    if share is None:
        return compute()[0], next(iter(unavailable), None)
    done, n = share.together(compute, model)
    exact = done.get("exact")
    for name in [name for name in done if name != "exact"] or [None]:  # the Fisher with the first variance
        mean, variance = share.mean(exact, None if name is None else done[name], n, model)
        if exact is not None:
            done["exact"], exact = mean, None
        if name is not None:
            done[name] = variance
    if optional:  # a process without rows, or whose rows met no such operation, says what the others met
        failed = sum(int(numbers[0]) for numbers in gather_numbers([float(bool(unavailable))], model, share.what))
        if failed and not unavailable:
            unavailable.append(f"{share.what}: {counted(failed, 'other process', 'other processes')} failed with "
                               f"NoForwardDerivative: {' '.join((NoForwardDerivative.__doc__ or '').split())}")
    return done, next(iter(unavailable), None)

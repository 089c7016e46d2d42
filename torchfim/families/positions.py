"""Outputs with position dimensions: one independent observation of a base family per position.

A network output of shape ``(B, *pos, C)`` (``C`` the base family's width, 1 for a Bernoulli
logit) is flattened to ``o`` of shape ``(B, L·C)`` with ``L = prod(pos)``, position-major
(entry ``t·C + a`` is output ``a`` at position ``t``). Given the input, the labels at the ``L``
positions are independent draws of the base family, and a ``mask`` (``(B, L)`` bool, True =
observed) drops positions (padding): a masked position has score ``u_t = 0`` and adds nothing
to the log-likelihood, the Fisher or any moment. Writing ``a_t = u_tᵀv_t`` for the score and a
vector at position ``t``, independence and ``E[u_t] = 0`` give the identities used below:

- ``E[(Σ_t a_t)(Σ_t b_t)] = Σ_t v_tᵀΛ_t w_t``; ``E[(Σ a_t)(Σ b_t)(Σ c_t)] = Σ_t E[a_t b_t c_t]``;
- ``E[(Σ a_t)²(Σ b_t)²] = Σ_t E[a_t² b_t²] + Σ_{t≠s} (E[a_t²] E[b_s²] + 2 E[a_t b_t] E[a_s b_s])``,
  i.e. Isserlis' formula for the summed second moments plus each position's fourth cumulant;
- ``E[(uᵀKu)²] = (tr ΛK)² + 2 tr(ΛKΛK) + Σ_t [E[(u_tᵀK_tt u_t)²] − (tr Λ_tK_tt)² − 2 tr(Λ_tK_ttΛ_tK_tt)]``
  with ``Λ`` the block-diagonal output Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .._identity import identity_like
from ..errors import TorchfimError, all_finite, warn_user
from .base import SQRT_BLOCK_ENTRIES, Family
from .positions_moments import DENSE_MOMENT_LIMIT, PositionMoments
from .positions_spectra import CHUNK_ELEMENTS as _CHUNK_ELEMENTS
from .positions_spectra import PositionSpectra
from .positions_spread import PositionSpreads


def is_position_mask(mask: object) -> bool:
    """Whether ``mask`` can mark observed positions: a bool tensor, or one of numbers holding only 0s and 1s
    (``attention_mask`` in any dtype). A fraction such as 0.5 marks nothing clearly, and neither does an integer
    other than 0 and 1 (a mask with -1 for padding would mark every position observed)."""
    if not isinstance(mask, Tensor) or mask.is_complex():
        return False
    return mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())


def positions_fit(given: Sequence[int], positions: Sequence[int]) -> bool:
    """Whether targets' position dims ``given`` hold one label per position of the outputs' ``positions``: the same
    dims (dims of 1 aside, ``(B, T, 1)`` for ``(B, T)``), or all of them flattened into one. Another shape with as
    many entries (``(B, W, H)`` for outputs ``(B, H, W, C)``) would pair labels with other positions (a review:
    the empirical trace 0.59× the right one, and another position's -100 left out, silently)."""
    if math.prod(given) != math.prod(positions):
        return False
    kept = [d for d in given if d != 1]
    return kept == [d for d in positions if d != 1] or len(kept) <= 1


class Positions(PositionMoments, PositionSpreads, PositionSpectra, Family):
    """Product family of ``L`` independent positions, each an observation of ``base`` given the input.

    Args:
        base: the family of one position (its width ``C`` is ``o.shape[1] // L``).
        positions: the position shape ``pos`` (an int or a tuple); ``L = prod(pos)``.
        mask: ``(B, L)`` or ``(B, *pos)`` bool, True where the position is observed; None = all.
            The engine builds one ``Positions`` per mini-batch, so ``B`` is that batch's size.

    Labels have shape ``(B, L, *base_label)`` (targets may also be given as
    ``(B, *pos, *base_label)``, and without the trailing 1 for a Bernoulli base); sampled labels
    ``(B, k, L, *base_label)``. Targets at masked positions may hold anything (e.g. ``-100``,
    PyTorch's ``ignore_index``): they are neither checked nor used, and come back from
    :meth:`check_targets` replaced by a valid placeholder label.

    Example:
        >>> import torch
        >>> from torchfim.families import Categorical, Positions
        >>> fam = Positions(Categorical(), 2, mask=torch.tensor([[True, False]]))
        >>> o = torch.zeros(1, 2 * 3, dtype=torch.float64)    # 2 positions × 3 classes
        >>> lam = fam.fisher_output(o)
        >>> lam.shape, round(float(lam[0, 0, 0]), 4), float(lam[0, 3:, 3:].abs().sum())
        (torch.Size([1, 6, 6]), 0.2222, 0.0)
        >>> y = fam.check_targets(torch.tensor([[2, -100]]), o)   # -100 at the masked position
        >>> fam.log_prob(o, y)    # log(1/3), the masked position adds nothing
        tensor([-1.0986], dtype=torch.float64)
    """

    name = "positions"

    def __init__(self, base: Family, positions: int | Sequence[int], mask: Tensor | None = None) -> None:
        if isinstance(base, Positions):
            # How this arises: family=Positions(...) with outputs (batch, *positions, C), which are wrapped per position.
            raise TorchfimError(
                f"family={base!r} was given outputs with positions of their own, (batch, *positions, C), which torchfim "
                f"already reads one output vector per position: pass its base family and mask instead, "
                f"family={base.base!r} (or {base.base.name!r}) and mask=<the (batch, {base.length}) mask>; a Positions "
                "family is for flat (batch, L·C) outputs, and does not nest"
            )
        if not isinstance(base, Family):
            raise TorchfimError(
                f"Positions needs a base Family instance (not a name, not Positions), got {base!r}; "
                "pass e.g. Positions(Categorical(), (seq_len,), mask)"
            )
        pos = (positions,) if isinstance(positions, int) else tuple(positions)
        if not pos or not all(isinstance(n, int) and n > 0 for n in pos):
            raise TorchfimError(f"positions must be positive ints (the position shape), got {positions!r}")
        self.base, self.positions, self.length = base, pos, math.prod(pos)
        self.label_ndim = base.label_ndim + 1
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dim() < 1 or tuple(mask.shape[1:]) not in (pos, (self.length,)) or not is_position_mask(mask):
                raise TorchfimError(
                    f"mask must be a bool tensor of shape (batch, {self.length}) or (batch, *{pos}) (0/1 numbers "
                    f"also do), got {mask.dtype} of shape {tuple(mask.shape)}; True marks observed positions"
                )
            mask = mask.reshape(mask.shape[0], self.length).bool()
        self.mask = mask

    def __repr__(self) -> str:
        masked = "None" if self.mask is None else f"<{tuple(self.mask.shape)} bool>"
        return f"Positions({self.base!r}, {self.positions}, mask={masked})"

    def for_rows(self, rows: slice) -> Positions:
        """The family of the outputs ``o[rows]``: the same positions, the mask's ``rows``."""
        return self if self.mask is None else Positions(self.base, self.positions, self.mask[rows])

    # ------------------------------------------------------------ layout
    def _width(self, o: Tensor) -> int:
        if o.dim() != 2 or o.shape[1] == 0 or o.shape[1] % self.length:
            raise TorchfimError(
                f"Positions({self.positions}) expects flat outputs of shape (batch, {self.length}·C), got "
                f"{tuple(o.shape)}; flatten (batch, *positions, C) outputs with o.reshape(len(o), -1)"
            )
        return o.shape[1] // self.length

    def _keep(self, o: Tensor) -> Tensor:
        """Observed positions ``(B, L)`` for this batch of outputs."""
        if self.mask is None:
            return torch.ones(o.shape[0], self.length, dtype=torch.bool, device=o.device)
        if self.mask.shape[0] != o.shape[0]:
            raise TorchfimError(
                f"the Positions mask covers {self.mask.shape[0]} inputs but the outputs have {o.shape[0]}; "
                "build the family per mini-batch with that batch's mask"
            )
        return self.mask.to(o.device)

    def _rows(self, o: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position outputs ``(B·L, C)`` (masked rows set to 0, so nothing non-finite leaks) and
        the flat observed mask ``(B·L,)``."""
        c = self._width(o)
        keep = self._keep(o).reshape(-1)
        rows = o.reshape(-1, c)
        if self.mask is None:  # all observed: no copy (a language model's rows span its vocabulary)
            return rows, keep
        return torch.where(keep.unsqueeze(-1), rows, torch.zeros((), dtype=o.dtype, device=o.device)), keep

    def _vector_rows(self, v: Tensor, c: int) -> Tensor:
        """``(B, m, L·C)`` output-space vectors → ``(B·L, m, C)`` per position."""
        b, m = v.shape[:2]
        return v.reshape(b, m, self.length, c).transpose(1, 2).reshape(b * self.length, m, c)

    def _per_position(self, keep: Tensor, values: Tensor) -> Tensor:
        """Per-row results ``(B·L, *shape)`` → ``(B, L, *shape)`` with masked positions 0."""
        if self.mask is not None:
            mask = keep.reshape(keep.shape + (1,) * (values.dim() - 1))
            values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return values.reshape(-1, self.length, *values.shape[1:])

    def _label_rows(self, y: Tensor, rows: Tensor, keep: Tensor) -> Tensor:
        """Labels ``(B, *extra, L, *bl)`` → ``(B·L, *extra, *bl)``, masked ones replaced by a filler."""
        lead = y.dim() - self.label_ndim
        y = y.movedim(lead, 1)
        y = y.reshape(-1, *y.shape[2:])
        filler = self.base._filler_label(rows).to(device=y.device, dtype=y.dtype)
        extra = lead - 1
        filler = filler.reshape(filler.shape[:1] + (1,) * extra + filler.shape[1:])
        mask = keep.reshape(keep.shape + (1,) * (y.dim() - 1))
        return torch.where(mask, y, filler)

    def _from_rows(self, keep: Tensor, values: Tensor) -> Tensor:
        """Per-row ``(B·L, *extra, C)`` → ``(B, *extra, L·C)`` with masked positions 0."""
        values = self._per_position(keep, values).movedim(1, -2)
        return values.reshape(*values.shape[:-2], -1)

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return (self.length,) + self.base._label_shape(o.reshape(-1, self._width(o)))

    def _filler_label(self, o: Tensor) -> Tensor:
        rows, _ = self._rows(o)
        filler = self.base._filler_label(rows)
        return filler.reshape(o.shape[0], self.length, *filler.shape[1:])

    # ------------------------------------------------------------ checks
    def check_output(self, o: Tensor) -> None:
        """The base family's checks on every observed position's output (masked ones may be anything)."""
        c = self._width(o)
        whole = getattr(self.base, "whole_width", None)
        if whole is not None and c != whole and self.positions[-1] * c == whole:
            # (batch, 3, 3) read as 3 positions of 3 outputs, where the family takes the 9 as one vector.
            shape = ", ".join(map(str, (*self.positions, c)))
            raise TorchfimError(
                f"family {self.base.name!r} expects {whole} outputs per input (or per position), but outputs "
                f"(batch, {shape}) are read as {self.length} positions of {c} outputs; reshape them to "
                f"(batch, {whole}) (out.reshape(len(out), {whole})), or (batch, *positions, {whole}) for several per "
                "input (out.flatten(-2))"
            )
        rows = o.reshape(-1, c)
        if self.mask is None:
            self.base.check_output(rows)
            return
        keep = self._keep(o).reshape(-1)
        self.base.check_output(rows[keep])
        if not all_finite(rows):
            nan = int(torch.isnan(rows.detach()[~keep]).any(-1).sum())  # (-inf is a class masked out, as elsewhere)
            if nan:
                _warn_masked_nan(nan, int((~keep).sum()))

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        """Canonical targets ``(B, L, *base_label)``: the base checks on observed positions; masked
        positions are not checked and get a placeholder label."""
        rows, keep = self._rows(o)
        label = self.base._label_shape(rows)
        b, n = o.shape[0], self.length
        shape, cut = tuple(y.shape), y.dim() - len(label)
        # Any position shape with L entries is accepted: (B, *pos, *label), (B, L, *label), and for a
        # Bernoulli base (label (1,)) also without the trailing 1.
        fits = shape[:1] == (b,) and cut >= 1 and shape[cut:] == label and positions_fit(shape[1:cut], self.positions)
        if not fits and not (label == (1,) and shape[:1] == (b,) and y.dim() >= 2
                             and positions_fit(shape[1:], self.positions)):
            raise TorchfimError(
                f"targets for outputs with positions {self.positions} (family {self.base.name!r} at each) must have "
                f"shape (batch, *positions, *{label}) with {n} positions, e.g. {(b, *self.positions, *label)}"
                f"{f' or, flattened, {(b, n, *label)}' if len(self.positions) > 1 else ''}, got {shape}; pass one "
                "label per position, its position dims in the outputs' order"
            )
        y = y.reshape(b * n, *label).to(o.device)
        checked = self.base.check_targets(y[keep], rows[keep])
        full = self.base._filler_label(rows).to(device=checked.device, dtype=checked.dtype).clone()
        full[keep] = checked
        return full.reshape(b, n, *label)

    # ------------------------------------------------------------ labels and scores
    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B, k, L, *base_label)``: ``base.sample`` on the ``(B·L, C)`` per-position outputs."""
        rows, _ = self._rows(o.detach())
        y = self.base.sample(rows, k, generator)
        return y.reshape(o.shape[0], self.length, *y.shape[1:]).transpose(1, 2).contiguous()

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B, k, L·C)``: ``base.sample_scores`` on the ``(B·L, C)`` per-position outputs (the draws of
        :meth:`sample`, without a one-hot of the labels over a vocabulary), 0 where masked."""
        rows, keep = self._rows(o)
        return self._from_rows(keep, self.base.sample_scores(rows, k, generator))

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        """``u = (u_1, …, u_L)`` with ``u_t`` the base score at position ``t`` (0 where masked)."""
        rows, keep = self._rows(o)
        return self._from_rows(keep, self.base.output_score(self._label_rows(y, rows, keep), rows))

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        """``Σ_t log p(y_t|o_t)`` over observed positions, with the labels' leading dims."""
        rows, keep = self._rows(o)
        log_p = self.base.log_prob(rows, self._label_rows(y, rows, keep))
        return self._per_position(keep, log_p).sum(1)

    # ------------------------------------------------------------ second moments
    def _block_diagonal(self, o: Tensor, blocks: Tensor) -> Tensor:
        """Per-row ``(B·L, C, r)`` blocks → block-diagonal ``(B, L·C, L·r)``."""
        _, keep = self._rows(o)
        per = self._per_position(keep, blocks)
        eye = identity_like(self.length, per)
        full = torch.einsum("btaj,ts->btasj", per, eye)
        return full.reshape(o.shape[0], self.length * blocks.shape[1], self.length * blocks.shape[2])

    def fisher_output(self, o: Tensor) -> Tensor:
        """Block-diagonal ``Λ = diag(Λ_1, …, Λ_L)`` (B, L·C, L·C), masked blocks 0."""
        return self._block_diagonal(o, self.base.fisher_output(self._rows(o)[0]))

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        """Block-diagonal ``S = diag(S_1, …, S_L)`` (B, L·C, L·r), masked columns 0."""
        return self._block_diagonal(o, self.base.fisher_output_sqrt(self._rows(o)[0]))

    def fisher_output_sqrt_count(self, o: Tensor) -> int:
        """The columns :meth:`fisher_output_sqrt_blocks` yields: ``r`` for each position some input observes."""
        c = self._width(o)
        observed = int(self._keep(o).reshape(o.shape[0], self.length).any(0).sum())
        return observed * (self.base.fisher_output_sqrt_width(c) or c)

    def fisher_output_sqrt_blocks(self, o: Tensor, max_entries: int | None = None) -> Iterator[Tensor]:
        """:meth:`fisher_output_sqrt`'s columns a few at a time, never the whole ``(B, L·C, L·r)``.

        Column ``t·r + j`` is ``S_t``'s column ``j`` at position ``t``, zero elsewhere: a block of ``K``
        columns holds ``B·L·C·K`` numbers, and ``S_t`` is built for a few positions at a time, or a block
        of its columns at a time where one position's ``S_t`` (``B·C·r``) is over the budget (a
        vocabulary of tens of thousands). Columns of positions that no input of the batch observes are
        zero, and left out. ``max_entries``: default :data:`SQRT_BLOCK_ENTRIES`.
        """
        max_entries = max_entries or SQRT_BLOCK_ENTRIES
        rows, keep = self._rows(o)
        b, n, c = o.shape[0], self.length, rows.shape[1]
        rows, keep = rows.reshape(b, n, c), keep.reshape(b, n)
        column = b * n * c  # numbers per column
        step = max(1, max_entries // max(1, column))  # columns per block
        width = self.base.fisher_output_sqrt_width(c)
        if width is not None and b * c * width > max_entries:
            yield from self._sqrt_column_blocks(rows, keep, width, step)
            return
        per_position = max_entries // max(1, column * c)  # positions whose S_t (r ≤ C columns each) fit a block
        for t0 in range(0, n, max(1, per_position)):
            t1 = min(n, t0 + max(1, per_position))
            if not bool(keep[:, t0:t1].any()):
                continue
            roots = self.base.fisher_output_sqrt(rows[:, t0:t1].reshape(-1, c))  # (B·P, C, r)
            roots = roots.reshape(b, t1 - t0, c, roots.shape[-1]) * keep[:, t0:t1, None, None].to(roots.dtype)
            yield from _placed(roots, t0, n, step)

    def placed_columns(self, o: Tensor, u: Tensor, max_entries: int | None = None) -> Iterator[Tensor]:
        """Each position's part of the output-space vectors ``u`` (B, L·C) as a column of its own, zero at every
        other position, in blocks ``(B, L·C, K)`` of under ``max_entries`` numbers where one column allows (default
        :data:`SQRT_BLOCK_ENTRIES`); masked positions are zero, and a block of positions that no input observes is
        left out. Pulled back, column ``t`` gives ``J_tᵀu_t``: summed, the per-position products
        ``Σ_t (J_tᵀu_t)(J_tᵀu_t)ᵀ`` (the empirical Fisher per position, ``u_t`` the true labels' scores)."""
        b, n, c = o.shape[0], self.length, self._width(o)
        keep = self._keep(o).reshape(b, n)
        step = max(1, (max_entries or SQRT_BLOCK_ENTRIES) // max(1, b * n * c))
        roots = (u.reshape(b, n, c) * keep.unsqueeze(-1).to(u.dtype)).unsqueeze(-1)  # (B, L, C, 1)
        for t0 in range(0, n, step):
            if bool(keep[:, t0:t0 + step].any()):
                yield from _placed(roots[:, t0:t0 + step], t0, n, step)

    def _sqrt_column_blocks(self, rows: Tensor, keep: Tensor, width: int, step: int) -> Iterator[Tensor]:
        """The blocks of :meth:`fisher_output_sqrt_blocks` one position at a time, ``step`` columns of its
        ``S_t`` (of ``width``) built at a time: ``rows`` (B, L, C), ``keep`` (B, L)."""
        b, n, c = rows.shape
        for t in range(n):
            if not bool(keep[:, t].any()):
                continue
            for start in range(0, width, step):
                roots = self.base.fisher_output_sqrt_columns(rows[:, t], start, min(width, start + step))
                block = roots.new_zeros(b, n, c, roots.shape[-1])
                block[:, t] = roots * keep[:, t, None, None].to(roots.dtype)
                yield block.reshape(b, n * c, roots.shape[-1])

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``Σ_t v_tᵀ Λ_t w_t``."""
        rows, keep = self._rows(o)
        c = rows.shape[1]
        per = self.base.fisher_output_bilinear(rows, self._vector_rows(v, c), self._vector_rows(w, c))
        return self._per_position(keep, per).sum(1)

    def _accumulate(self, o: Tensor, v: Tensor, step: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``Σ_t step(o_t, v_t)`` for a per-position ``step`` returning (·, m, m), in chunks of
        positions so that at most ``_CHUNK_ELEMENTS`` per-position entries are held."""
        b, m = v.shape[:2]
        c = self._width(o)
        keep = self._keep(o)
        span = max(1, _CHUNK_ELEMENTS // max(1, b * m * m))
        total = None
        for start in range(0, self.length, span):
            stop = min(start + span, self.length)
            sub = Positions(self.base, stop - start, keep[:, start:stop])
            part = sub._accumulate_chunk(o[:, start * c : stop * c], v[..., start * c : stop * c], step)
            total = part if total is None else total + part
        return total

    def _accumulate_chunk(self, o: Tensor, v: Tensor, step: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        rows, keep = self._rows(o)
        return self._per_position(keep, step(rows, self._vector_rows(v, rows.shape[1]))).sum(1)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        """``Σ_t V_t Λ_t V_tᵀ`` (B, m, m)."""
        return self._accumulate(o, v, self.base.fisher_output_gram)


__all__ = ["DENSE_MOMENT_LIMIT", "Positions", "is_position_mask"]


def _placed(roots: Tensor, t0: int, n: int, step: int) -> Iterator[Tensor]:
    """The columns of ``roots`` (B, P, C, r), the factors of positions ``t0 … t0 + P − 1``, each placed at its
    position among ``n`` and zero elsewhere: blocks ``(B, n·C, K)`` of ``step`` columns (position-major)."""
    b, p, c, r = roots.shape
    for q0 in range(0, p * r, step):
        cols = torch.arange(q0, min(p * r, q0 + step), device=roots.device)
        t, j = torch.div(cols, r, rounding_mode="floor"), cols % r
        block = roots.new_zeros(b, n, c, len(cols))
        block[:, t0 + t, :, torch.arange(len(cols), device=roots.device)] = roots[:, t, :, j]
        yield block.reshape(b, n * c, len(cols))


def _warn_masked_nan(bad: int, masked: int) -> None:
    """Say that ``bad`` of the ``masked`` left-out positions have NaN outputs: left out of the Fisher, they are
    harmless only where the model does not compute them from the parameters, as their NaN derivatives would reach
    every parameter through the backward passes."""
    warn_user(f"torchfim: the model's outputs are NaN at {bad} of the {masked} masked positions; they are left "
              "out, but where the model computes them from its parameters their derivatives are NaN too and make "
              "the Fisher NaN. transformers' eager attention does this on a left-padded batch (a query whose keys "
              "are all padding): load the model with attn_implementation='sdpa', or pad on the right")

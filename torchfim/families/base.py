"""The :class:`Family` interface every output family implements, and shared moment helpers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from .._identity import identity_like
from .._words import counted
from ..errors import TorchfimError, all_finite, warn_user
from .output_origin import last_operation

_HALF = (torch.float16, torch.bfloat16)
#: Smallest positive normal float64: below it relative precision is lost.
_TINY64 = torch.finfo(torch.float64).tiny
#: Numbers per block of the exact Fisher's output vectors (:meth:`Family.fisher_output_sqrt_blocks`).
SQRT_BLOCK_ENTRIES = 1 << 24


def _to_generator_device(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Move ``t`` to the device a generator draws on (sampling then stays reproducible)."""
    if generator is not None and t.device != generator.device:
        return t.to(generator.device)
    return t


def _integers(y: Tensor) -> bool:
    """Whether ``y`` holds integers (or booleans) by its dtype, as class labels do."""
    return not (y.is_floating_point() or y.is_complex())


def _work_dtype(*tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """``(work, out)``: the promoted dtype of ``tensors`` (``out``), widened to float32 when it is
    float16/bfloat16 (``work``), so that sums and exponentials never run in half precision."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return (torch.float32 if out in _HALF else out), out


def _wide_float(device: torch.device) -> torch.dtype:
    """float64, except on devices without it (Apple MPS), where float32 is the widest."""
    return torch.float32 if device.type == "mps" else torch.float64


def _isserlis_moment4(lam_diag: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """``E[(uᵀv)²(uᵀw)²]`` for centred Gaussian ``u`` with diagonal covariance ``lam_diag`` (B, C)."""
    lam = lam_diag.unsqueeze(1)
    vv, ww, vw = (lam * v * v).sum(-1), (lam * w * w).sum(-1), (lam * v * w).sum(-1)
    return vv * ww + 2 * vw**2


def _isserlis_pairwise(lam_diag: Tensor, v: Tensor) -> Tensor:
    """``E[(uᵀv_p)²(uᵀv_q)²] = (v_pᵀΛv_p)(v_qᵀΛv_q) + 2(v_pᵀΛv_q)²`` for centred Gaussian ``u`` with
    diagonal covariance ``Λ = diag(lam_diag)`` (B, C), ``v`` (B, m, C) → (B, m, m)."""
    gram = torch.bmm(v * lam_diag.unsqueeze(1), v.transpose(1, 2))
    along = torch.diagonal(gram, dim1=-2, dim2=-1)
    return along.unsqueeze(-1) * along.unsqueeze(-2) + 2 * gram**2


def _isserlis_quadratic(lam_diag: Tensor, k: Tensor) -> Tensor:
    """``E[(uᵀKu)²]`` for centred Gaussian ``u`` with diagonal covariance: ``(tr KΛ)² + 2 tr(KΛKΛ)``."""
    kl = k * lam_diag.unsqueeze(1)  # K Λ
    return torch.einsum("naa->n", kl) ** 2 + 2 * torch.einsum("nab,nba->n", kl, kl)


def _isserlis(lam: Tensor) -> Tensor:
    """``E[u_a u_b u_c u_d]`` of a centred Gaussian with covariance ``lam`` (B, C, C)."""
    return (
        torch.einsum("nab,ncd->nabcd", lam, lam)
        + torch.einsum("nac,nbd->nabcd", lam, lam)
        + torch.einsum("nad,nbc->nabcd", lam, lam)
    )


def robust_eigvalsh(a: Tensor) -> Tensor:
    """Eigenvalues (ascending, float64) of symmetric matrices ``a`` (..., n, n).

    Half and bfloat16 have no eigen-solver and float32 ones may fail to converge on ill-conditioned
    matrices (confident classifiers), so the solve runs in float64 on a symmetrised copy divided by
    its largest entry (``eig(a) = s · eig(a / s)``, which keeps tiny and huge matrices away from
    underflow); a matrix whose solver still fails gets the Gershgorin upper bound
    ``max_i Σ_j |a_ij|`` on its spectrum in its top entry (callers use the top eigenvalue as a
    bound constant, which an upper bound keeps valid).
    """
    a64 = a.to(torch.float64)
    a64 = 0.5 * (a64 + a64.transpose(-1, -2))
    scale = a64.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_TINY64)
    try:
        return torch.linalg.eigvalsh(a64 / scale) * scale.squeeze(-1)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        radius = a64.abs().sum(-1).amax(-1)
        n = a64.shape[-1]
        evals = torch.zeros(a64.shape[:-1], dtype=torch.float64, device=a64.device)
        evals[..., n - 1] = radius
        return evals


def _top_eig_diag_plus_rank_one(d: Tensor, z: Tensor, steps: int = 100) -> Tensor:
    """``λ_max(diag(d) + z zᵀ)`` per row of ``d, z`` (B, n), float64, by bisection on the secular equation.

    The top eigenvalue is the root in ``(max d, max d + ‖z‖²]`` of ``g(μ) = 1 − Σ_a z_a²/(μ − d_a)``,
    which increases there; each step halves the bracket, O(B·n) work.
    """
    d, z2 = d.to(torch.float64), z.to(torch.float64) ** 2
    lo = d.amax(-1)
    hi = lo + z2.sum(-1)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        gap = mid.unsqueeze(-1) - d
        # A pole at or above mid (gap ≤ 0 with z_a ≠ 0) means mid is still below the root.
        terms = torch.where(gap > 0, z2 / gap.clamp_min(_TINY64), torch.inf)
        terms = torch.where(z2 > 0, terms, 0.0)
        below_root = terms.sum(-1) > 1  # g(mid) < 0
        lo, hi = torch.where(below_root, mid, lo), torch.where(below_root, hi, mid)
    return 0.5 * (lo + hi)


#: The refusal of outputs with NaN or Inf entries.
NON_FINITE = ("the model produced non-finite outputs (NaN or Inf); check the inputs for NaN/Inf and the parameters "
              "for divergence (e.g. lower the learning rate) before computing the Fisher")

class Family(ABC):
    """An output distribution ``p(y | o)`` over labels given a network output ``o``.

    Subclasses provide the label sampler, the output score ``u``, the output
    Fisher ``Λ(o)`` with a square-root factor, the fourth moments of ``u`` and the
    negative log-likelihood. All methods work on batches ``o`` of shape ``(B, C)``.

    What the estimators rest on (docs/math.md §1): the score ``u = ∇_o log p(y|o)`` of a label drawn from the
    family has ``E[u] = 0`` and ``E[u uᵀ] = Λ(o)``, so ``Jᵀ u uᵀ J`` averages to ``Jᵀ Λ J``.

    Precision: float16/bfloat16 outputs are accepted; the families compute in float32 (or wider)
    and return results in the output's dtype unless a method says otherwise; eigen-solvers run in
    float64 only (:func:`robust_eigvalsh`).

    Example:
        >>> import torch
        >>> from torchfim.families import get_family
        >>> fam = get_family("categorical")
        >>> o = torch.tensor([[0.5, -0.5, 0.0]], dtype=torch.float64)
        >>> u = fam.sample_scores(o, 100_000, torch.Generator().manual_seed(0))[0]  # (k, C): k drawn labels' scores
        >>> bool(u.mean(0).abs().max() < 0.01), bool((u.T @ u / len(u) - fam.fisher_output(o)[0]).abs().max() < 0.01)
        (True, True)
    """

    #: Name used to select the family by string.
    name: str = ""
    #: Number of trailing label dimensions (0 for a class index, 1 for a vector).
    label_ndim: int = 1
    #: Warnings by the autograd node that made the outputs (:mod:`.output_origin`): an inverse link the
    #: family would misread as its natural parameters.
    misread: dict[str, str] = {}
    #: Whether outputs that a :attr:`misread` operation made and a constant was added to are still misread (positive
    #: rates plus 1e-6 are rates; a sigmoid's probabilities shifted are no longer probabilities).
    misread_through_shifts = False

    def for_rows(self, rows: slice) -> Family:
        """The family of the outputs ``o[rows]`` of a mini-batch: itself, unless it holds something per
        input (the position mask of :class:`~torchfim.families.positions.Positions`)."""
        return self

    # ----------------------------------------------------------------- checks
    def check_output(self, o: Tensor) -> None:
        """Raise :class:`TorchfimError` unless ``o`` is a finite ``(B, C)`` output this family accepts."""
        if o.dim() != 2:
            raise TorchfimError(
                f"family {self.name!r} expects model outputs of shape (batch, {self._width_hint()}), "
                f"got shape {tuple(o.shape)}; make the model return one flat output vector per input "
                "(e.g. end with nn.Flatten() or reshape in forward)"
            )
        self._check_width(o.shape[1])
        if (message := self._unusable_values(o)) is not None:
            raise TorchfimError(message)
        if self.misread and (message := self.misread.get(last_operation(o, self.misread_through_shifts) or "")):
            warn_user(message)

    def _unusable_values(self, o: Tensor) -> str | None:
        """Why the values of the outputs ``o`` cannot be read (None where they can): NaN or ±Inf."""
        if all_finite(o):
            return None
        return NON_FINITE

    def _width_hint(self) -> str:
        return "C"

    def _check_width(self, width: int) -> None:
        if width < 1:
            raise TorchfimError(f"family {self.name!r} needs at least one output per input, got 0")

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        """Validate true targets for a batch of outputs and return them in canonical form.

        Targets must have shape ``(B, *label_shape)`` (``(B,)`` where that is ``(B, 1)``) and be finite
        (NaN/Inf targets would make the empirical Fisher NaN). Real-valued targets come back in the
        output's dtype, widened to float32 for half-precision outputs.
        """
        want = (o.shape[0],) + self._label_shape(o)
        if want[1:] == (1,) and tuple(y.shape) == want[:1]:  # one target per input for one output per input
            y = y.unsqueeze(1)
        if tuple(y.shape) != want:
            fix = ("integer targets, one per input, look like class indices: pass family='categorical' if the "
                   f"outputs are class scores (logits), else targets of shape {want}"
                   if _integers(y) and tuple(y.shape) == want[:1] else
                   "pass one target per input, aligned with the inputs")
            raise TorchfimError(
                f"targets for family {self.name!r} must have shape {want} for outputs of shape "
                f"{tuple(o.shape)}, got {tuple(y.shape)}; {fix}"
            )
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            bad = int((~torch.isfinite(y)).sum())
            raise TorchfimError(
                f"targets for family {self.name!r} contain {counted(bad, 'non-finite value')} (NaN or Inf); "
                "drop or impute those targets before computing the empirical Fisher"
            )
        return y.to(device=o.device, dtype=_work_dtype(o)[0])

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return (o.shape[1],)

    def _align(self, y: Tensor, o: Tensor) -> Tensor:
        """View ``o`` (B, C) with singleton dims matching the labels' extra leading dims."""
        extra = y.dim() - 1 - self.label_ndim
        return o.reshape(o.shape[:1] + (1,) * extra + o.shape[1:])

    def _filler_label(self, o: Tensor) -> Tensor:
        """A valid label per input, shape ``(B, *label_shape)``, put where a label is required but
        ignored (masked positions of :class:`~torchfim.families.positions.Positions`).

        Default: one draw from ``p(·|o)`` with a fixed seed; families override it with a constant.
        """
        generator = torch.Generator(device=o.device).manual_seed(0)
        return self.sample(o.detach(), 1, generator)[:, 0]

    # ------------------------------------------------------------ interface
    @abstractmethod
    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``k`` labels per input from ``p(·|o)``: shape ``(B, k, *label_shape)``.

        Randomness comes only from ``generator`` (torch's global generator when None).
        """

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` output scores ``u = ∇_o log p(y|o)`` per input for labels ``y ~ p(·|o)``: ``(B, k, C)``.

        Default: ``output_score(sample(o, k, generator), o)``. Families whose labels cannot carry their
        spread at large outputs (``y − E[y]`` lost to rounding) draw the scores directly, from the same
        random numbers.
        """
        return self.output_score(self.sample(o, k, generator), o)

    @abstractmethod
    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        """Output score ``u = ∇_o log p(y|o)``, shape ``(*y's leading dims, C)``."""

    @abstractmethod
    def fisher_output(self, o: Tensor) -> Tensor:
        """Output Fisher ``Λ(o) = E[u uᵀ] = −∇²_o log p(y|o)``, shape ``(B, C, C)``."""

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        """A factor ``S`` (B, C, r) with ``S Sᵀ = Λ(o)`` (so ``Jᵀ Λ J = (SᵀJ)ᵀ(SᵀJ)``), ``r ≤ C``.

        Each column costs one backward pass in the exact Fisher, so families whose
        ``Λ`` has rank below ``C`` return fewer columns. Default: ``S = Q diag(√max(σ, 0))`` from
        the eigen-decomposition ``Λ = Q diag(σ) Qᵀ`` computed in float64.
        """
        lam = self.fisher_output(o).to(torch.float64)
        evals, evecs = torch.linalg.eigh(0.5 * (lam + lam.transpose(-1, -2)))
        return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).to(o.dtype)

    def fisher_output_sqrt_width(self, c: int) -> int | None:
        """The number ``r`` of columns of :meth:`fisher_output_sqrt` for outputs of width ``c``, where the
        family knows it without computing ``Λ``; None otherwise (the default)."""
        return None

    def fisher_output_sqrt_count(self, o: Tensor) -> int:
        """How many columns :meth:`fisher_output_sqrt_blocks` yields for ``o``: ``r`` where the family knows it
        in advance, else ``C`` (the most there can be)."""
        return self.fisher_output_sqrt_width(o.shape[-1]) or o.shape[-1]

    def fisher_output_sqrt_columns(self, o: Tensor, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of :meth:`fisher_output_sqrt`, ``(B, C, stop − start)``. Default: sliced
        from the whole factor; a family with many outputs builds the block alone."""
        return self.fisher_output_sqrt(o)[..., start:stop]

    def fisher_output_sqrt_blocks(self, o: Tensor, max_entries: int | None = None) -> Iterator[Tensor]:
        """The columns of :meth:`fisher_output_sqrt`, in order, as blocks ``(B, C, r_k)``, each under
        ``max_entries`` numbers (default :data:`SQRT_BLOCK_ENTRIES`) where one column allows: ``S``
        whole where it fits or its width is not known in advance (:meth:`fisher_output_sqrt_width`),
        else :meth:`fisher_output_sqrt_columns` a block at a time. A family whose ``S`` is large and
        mostly zero (outputs with positions) yields a few columns at a time."""
        max_entries = max_entries or SQRT_BLOCK_ENTRIES
        b, c = o.shape[0], o.shape[-1]
        r = self.fisher_output_sqrt_width(c)
        if r is None or b * c * r <= max_entries:
            yield self.fisher_output_sqrt(o)
            return
        step = max(1, max_entries // (b * c))
        for start in range(0, r, step):
            yield self.fisher_output_sqrt_columns(o, start, min(r, start + step))

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``E_y[(uᵀv)(uᵀw)] = vᵀ Λ(o) w`` for output-space vectors ``v, w`` (B, m, C) → (B, m)."""
        return torch.einsum("nma,nab,nmb->nm", v, self.fisher_output(o), w)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        """``G_pq = v_pᵀ Λ(o) v_q`` for output-space vectors ``v`` (B, m, C) → (B, m, m)."""
        return torch.einsum("npa,nab,nqb->npq", v, self.fisher_output(o), v)

    @abstractmethod
    def fourth_moment(self, o: Tensor) -> Tensor:
        """``E_y[u_a u_b u_c u_d]``, shape ``(B, C, C, C, C)``."""

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``E_y[(uᵀv)² (uᵀw)²]`` for output-space vectors ``v, w`` (B, m, C) → (B, m)."""
        return torch.einsum("nabcd,nma,nmb,nmc,nmd->nm", self.fourth_moment(o), v, v, w, w)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        """``E_y[(uᵀ K u)²]`` for symmetric ``K`` (B, C, C) → (B,)."""
        return torch.einsum("nabcd,nab,ncd->n", self.fourth_moment(o), k, k)

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``Var_y[uᵀKu] = E_y[(uᵀKu)²] − (tr ΛK)²`` for symmetric ``K`` (B, C, C) → (B,): the one-label Î1
        variance of the trace, ``K`` an input's output gram ``JJᵀ``. Where the scores lie on a line ``u = s e``
        (:meth:`score_line`) it is ``Var(s²)(eᵀKe)²``, formed without cancellation; else the difference of
        :meth:`quadratic_moment` and ``(tr ΛK)²``."""
        if (line := self.score_line(o)) is not None:
            spread, e = line
            return spread * torch.einsum("a,nab,b->n", e.to(k.dtype), k, e.to(k.dtype)).square()
        eye = identity_like(k.shape[-1], k).expand_as(k)
        return self.quadratic_moment(o, k) - self.fisher_output_bilinear(o, eye, k).sum(-1) ** 2

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``E_y[(uᵀv)²] = vᵀΛv`` and ``E_y[(uᵀv)⁴]`` for output-space vectors ``v`` (B, m, C) → (B, m) each."""
        return self.fisher_output_bilinear(o, v, v), self.moment4(o, v, v)

    def spread_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``E_y[(uᵀv)²] = vᵀΛv`` and ``Var_y[(uᵀv)²] = E_y[(uᵀv)⁴] − (vᵀΛv)²`` for output-space vectors ``v``
        (B, m, C) → (B, m) each: the one-label Î1 variance of a diagonal entry. Where the scores lie on a line it is
        ``Var(s²)(vᵀe)⁴`` (:meth:`along_score_line`), formed without cancellation; else the difference of
        :meth:`moments_along`."""
        if (along := self.along_score_line(o, v)) is not None:
            spread, squares = along
            return self.fisher_output_bilinear(o, v, v), spread.unsqueeze(1) * squares**2
        second, fourth = self.moments_along(o, v)
        return second, fourth - second**2

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """``E_y[(uᵀv_p)² (uᵀv_q)²]`` for every pair of output-space vectors ``v`` (B, m, C) → (B, m, m).

        The Î1 variance of ``full``/``blocks`` entries needs it; families override it to avoid the
        ``C⁴`` moment tensor (memory linear in ``C`` per input and vector).
        """
        return torch.einsum("nabcd,npa,npb,nqc,nqd->npq", self.fourth_moment(o), v, v, v, v)

    def pairwise_spread(self, o: Tensor, v: Tensor) -> Tensor:
        """``Var_y[(uᵀv_p)(uᵀv_q)] = E_y[(uᵀv_p)²(uᵀv_q)²] − (v_pᵀΛv_q)²`` for every pair of output-space vectors ``v``
        (B, m, C) → (B, m, m): the one-label Î1 variance of a ``full`` or ``blocks`` entry. Where the scores lie on a
        line it is ``Var(s²)(v_pᵀe)²(v_qᵀe)²`` (:meth:`along_score_line`), formed without cancellation; else the
        difference of :meth:`pairwise_moment4` and the squared :meth:`fisher_output_gram`."""
        if (along := self.along_score_line(o, v)) is not None:
            spread, squares = along
            return spread.reshape(-1, 1, 1) * squares.unsqueeze(-1) * squares.unsqueeze(-2)
        return self.pairwise_moment4(o, v).sub_(self.fisher_output_gram(o, v).square_())

    def third_moment(self, o: Tensor) -> Tensor:
        """``E_y[u_a u_b u_c]``, shape ``(B, C, C, C)`` (the covariance of Î1 and Î2 needs it)."""
        raise TorchfimError(
            f"family {self.name!r} does not provide third moments of its output score; "
            "implement Family.third_moment to use the combined estimator with it"
        )

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """``E_y[(uᵀa)(uᵀb)(uᵀc)]`` for output-space vectors ``a, b, c`` (B, m, C) → (B, m)."""
        return torch.einsum("nxyz,nmx,nmy,nmz->nm", self.third_moment(o), a, b, c)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(Λ(o))`` per input, shape ``(B,)``: the constant of the Î2 spectral bound."""
        return robust_eigvalsh(self.fisher_output(o))[..., -1].to(o.dtype)

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(M)`` per input, shape ``(B,)``, ``M = E[vec(uuᵀ) vec(uuᵀ)ᵀ]`` read as ``C²×C²``.

        The constant of the spectral Î1 bound. Any upper bound on it keeps that bound valid, so
        families may return a cheaper upper bound where the exact value is out of reach (say so).
        """
        c = o.shape[-1]
        return robust_eigvalsh(self.fourth_moment(o).reshape(o.shape[0], c * c, c * c))[..., -1].to(o.dtype)

    def score_line(self, o: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(Var(s²), e)`` where every score is a multiple ``u = s e`` of one output-space vector ``e`` (C,): a family
        of one output (``e = 1``), or two categories (``e = e₀ − e₁``); ``Var(s²)`` per input ``(B,)``, formed without
        cancellation. None (the default) where the scores span more: the Î1 variances then subtract ``(vᵀΛw)²`` from
        the fourth moments themselves (:class:`~torchfim.variance.ScoreVariance`)."""
        return None

    def along_score_line(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(Var(s²), (vᵀe)²)`` for output-space vectors ``v`` (B, m, C) → ``((B,), (B, m))`` where the scores lie on
        a line (:meth:`score_line`); None where they do not."""
        if (line := self.score_line(o)) is None:
            return None
        spread, e = line
        return spread, (v @ e.to(v.dtype)).square()

    @abstractmethod
    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        """``log p(y|o)`` with the labels' leading dims (``(B,)`` or ``(B, k)``)."""

    def nll(self, o: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood, mean over every label given (0-dim tensor)."""
        return -self.log_prob(o, y).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

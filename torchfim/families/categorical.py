"""The categorical family: logits of C classes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..errors import TorchfimError, all_finite, warn_user
from .base import _TINY64, NON_FINITE, Family, _to_generator_device, _wide_float, _work_dtype, robust_eigvalsh
from .bernoulli import Bernoulli

#: Classes up to which :meth:`Categorical.fourth_moment_top_eigenvalue` is exact (a float64
#: C×C eigen-solve per input); above it returns a Collatz–Wielandt upper bound in O(C) memory.
EXACT_FOURTH_TOP_CLASSES = 128
#: Float64 entries of C×C work matrices held at once (inputs are processed in chunks).
_CHUNK_ELEMENTS = 1 << 24
#: Geometric bisection steps: the log-bracket is at most ln(1/tiny) ≈ 708, halved to ≲ 1e-17.
_SECULAR_STEPS = 72
#: Power iterations for the bound above EXACT_FOURTH_TOP_CLASSES, and the relative gap to the
#: Rayleigh quotient at which they stop.
_POWER_STEPS = 100
_POWER_GAP = 1e-10
#: An Î1 variance of three or more classes is first a difference of moments, ``E[x²] − E[x]²``; an entry where that
#: keeps under this share of ``E[x²]`` (four bits or more cancelled) is formed again from the labels, centred.
_CANCELLED = 1.0 / 16


def _probabilities64(o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``p = softmax(o)`` in float64, the top class ``r`` (B, 1) and ``q = 1 − p_r`` (B,).

    ``q`` is the sum of the other classes' probabilities, so it keeps full relative precision when
    ``p_r`` rounds to 1 (``1 − p_r`` would cancel to 0).
    """
    p = torch.softmax(o.to(torch.float64), dim=-1)
    r = p.argmax(-1, keepdim=True)
    return p, r, p.scatter(-1, r, 0.0).sum(-1)


def _fisher_top_eigenvalue(p: Tensor, r: Tensor, q: Tensor) -> Tensor:
    """``λ_max(diag(p) − ppᵀ)`` (B,), float64, by geometric bisection on the secular equation.

    By interlacing the top eigenvalue lies in ``[p_(2), p_(1)]`` and is the root there of
    ``f(μ) = 1 − Σ_a p_a²/(p_a − μ) = (p_r q − μ)/(p_r − μ) − Σ_{a≠r} p_a²/(p_a − μ)`` (decreasing),
    with ``r`` the top class and ``q = 1 − p_r``. The second form has no cancellation, so the root
    keeps relative precision however confident the classifier; bisection on ``log μ`` reaches it
    from any bracket in ``_SECULAR_STEPS`` steps. If ``p_(2)`` underflows, ``λ_max ≤ tr Λ ≤ 2q``
    is returned (a number below float64's normal range).
    """
    p_top = p.gather(-1, r).squeeze(-1)
    others = p.scatter(-1, r, 0.0)
    second = others.amax(-1)
    log_lo, log_hi = second.clamp_min(_TINY64).log(), p_top.log()
    for _ in range(_SECULAR_STEPS):
        middle = 0.5 * (log_lo + log_hi)
        mu = torch.exp(middle)
        top_term = (p_top * q - mu) / (p_top - mu)
        gaps = others - mu.unsqueeze(-1)  # < 0 strictly inside the bracket
        # p_a · (p_a/(p_a − μ)): the square p_a² would underflow for p_a ≲ 1e-154.
        rest = torch.where(others > 0, others * (others / torch.where(gaps != 0, gaps, -1.0)), 0.0).sum(-1)
        past_root = (top_term - rest) < 0
        log_lo, log_hi = torch.where(past_root, log_lo, middle), torch.where(past_root, middle, log_hi)
    root = torch.exp(0.5 * (log_lo + log_hi))
    return torch.where(second >= _TINY64, root, 2 * q)


def _score_gram_squared(p: Tensor, r: Tensor, q: Tensor) -> Tensor:
    """``G_yz = (d_yᵀ d_z)²`` (B, C, C) for the scores ``d_y = e_y − p``, float64.

    ``d_yᵀd_z = δ_yz − p_y − p_z + ‖p‖²``; the row and column of the top class ``r`` use the
    cancellation-free form ``d_rᵀd_z = w_z − w_r + ‖w‖²`` with ``w = d_r`` (``w_r = q``), since
    ``d_r`` is tiny when ``p_r ≈ 1`` while the general form subtracts numbers near 1.
    """
    c = p.shape[-1]
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    inner = eye - p.unsqueeze(-1) - p.unsqueeze(-2) + (p * p).sum(-1)[:, None, None]
    w = (-p).scatter(-1, r, q.unsqueeze(-1))
    row = w - q.unsqueeze(-1) + (w * w).sum(-1, keepdim=True)
    index = r.unsqueeze(-1).expand(-1, 1, c)
    inner.scatter_(1, index, row.unsqueeze(1))
    inner.scatter_(2, index.transpose(1, 2), row.unsqueeze(2))
    return inner**2


def _structured_product(p: Tensor, r: Tensor, q: Tensor) -> Callable[[Tensor], Tensor]:
    """``y ↦ G y`` for ``G_yz = (d_yᵀd_z)²``, in O(C) per input.

    For ``y, z ≠ r``: ``d_yᵀd_z = δ_yz + b_y + b_z`` with ``b = ‖p‖²/2 − p``, so
    ``G_yz = δ_yz (1 + 4b_y) + b_y² + 2 b_y b_z + b_z²`` (diagonal plus rank 3; ``1 + 2b_y ≥ ‖p‖²``
    there, so no cancellation); the row and column of ``r`` use the accurate ``d_rᵀd_z``.
    """
    b = 0.5 * (p * p).sum(-1, keepdim=True) - p
    w = (-p).scatter(-1, r, q.unsqueeze(-1))
    row = (w - q.unsqueeze(-1) + (w * w).sum(-1, keepdim=True)) ** 2  # G_rz
    diagonal = 1 + 4 * b
    powers = torch.stack([torch.ones_like(b), b, b * b], dim=-1)  # (B, C, 3): 1, b, b²
    others = torch.ones_like(p).scatter(-1, r, 0.0)
    pair_weights = torch.tensor([1.0, 2.0, 1.0], dtype=p.dtype, device=p.device)

    def multiply(y: Tensor) -> Tensor:
        rest = y * others
        sums = torch.bmm(rest.unsqueeze(1), powers)  # (B, 1, 3): Σ y, Σ b y, Σ b² y over z ≠ r
        weights = (sums.flip(-1) * pair_weights).transpose(1, 2)  # Σ b²y, 2Σ by, Σ y
        gy = diagonal * rest + torch.bmm(powers, weights).squeeze(-1) + row * y.gather(-1, r)
        return gy.scatter(-1, r, (row * y).sum(-1, keepdim=True))

    return multiply


def _entries(lossy: Tensor, classes: int) -> Iterator[tuple[Tensor, ...]]:
    """The indices of the ``lossy`` entries, a few at a time: each of them gathers its inputs' logits and vectors in
    float64 (``C`` numbers each, a few copies), which for every entry of a ``full`` block would take many times the
    block's own memory."""
    if not bool(lossy.any()):
        return
    found = lossy.nonzero(as_tuple=True)
    step = max(1, _CHUNK_ELEMENTS // (8 * classes))
    for start in range(0, len(found[0]), step):
        yield tuple(index[start:start + step] for index in found)


def _label_spread(o: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """``Var_y[s_y t_y] = Σ_y p_y (s_y t_y − x̄)²`` with ``x̄ = Σ_y p_y s_y t_y``, ``s_y = v_y − pᵀv`` and
    ``t_y = w_y − pᵀw``, for rows of logits and output-space vectors ``o, v, w`` (k, C) → (k,) in the widest float:
    two passes, so nothing is the difference of two nearly equal moments. The few entries that need it are formed
    here; in their own precision the products' rounding would still be amplified by the cancellation's ratio."""
    wide = _wide_float(o.device)
    p = torch.softmax(o.to(wide), dim=-1)
    v, w = v.to(wide), w.to(wide)
    x = (v - (p * v).sum(-1, keepdim=True)) * (w - (p * w).sum(-1, keepdim=True))
    return (p * (x - (p * x).sum(-1, keepdim=True)).square()).sum(-1)


def _collatz_wielandt_bound(p: Tensor, r: Tensor, q: Tensor) -> Tensor:
    """Upper bound on ``λ_max(K)``, ``K = diag(√p) G diag(√p)``, from the similar-up-to-zeros
    non-negative matrix ``A = G diag(p)``: ``min_j max_y (A x_j)_y/(x_j)_y`` over power iterates
    ``x_{j+1} = A x_j`` from ``x_0 = 1`` (Collatz–Wielandt). ``A`` rather than ``K`` keeps the
    iterates clear of underflow when ``p`` is tiny. Stops once within ``_POWER_GAP`` of the
    Rayleigh quotient of ``K`` at ``√p ∘ x`` (a lower bound), after at most ``_POWER_STEPS``."""
    multiply = _structured_product(p, r, q)
    x = torch.ones_like(p)
    best = torch.full(p.shape[:1], torch.inf, dtype=p.dtype, device=p.device)
    for _ in range(_POWER_STEPS):
        ax = multiply(p * x).clamp_min(0)
        ratio = torch.where(x > 0, ax / torch.where(x > 0, x, 1.0), 0.0).amax(-1)
        best = torch.minimum(best, ratio)
        rayleigh = (p * x * ax).sum(-1) / (p * x * x).sum(-1).clamp_min(_TINY64)
        if bool((best - rayleigh <= _POWER_GAP * best).all()):
            break
        x = ax / ax.amax(-1, keepdim=True).clamp_min(_TINY64)
    return best


_FUSED_NLL = (torch.float32, torch.float64)  # dtypes whose cross-entropy runs in the dtype itself


#: A categorical model that returns probabilities where logits are expected.
PROBABILITIES = (
    "torchfim: the model's outputs are probability vectors (each row non-negative, summing to 1), but the "
    "categorical family reads them as logits (p = softmax(outputs)), so the Fisher would be that of another "
    "model; drop the final softmax, or return its log (log_softmax: log-probabilities are logits too)"
)


class Categorical(Family):
    """Categorical over ``C`` classes with logits ``o``: ``p = softmax(o)``.

    ``u = e_y − p``; ``Λ = diag(p) − ppᵀ``; moments by exact enumeration over the ``C`` classes
    (``E[f(u)] = Σ_y p_y f(e_y − p)``). Half-precision logits are handled in float32, spectra in
    float64.

    Example:
        >>> import torch
        >>> from torchfim.families import Categorical
        >>> o = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)  # logits of C = 3 classes
        >>> p = o.softmax(-1)[0]
        >>> torch.allclose(Categorical().fisher_output(o)[0], torch.diag(p) - torch.outer(p, p))  # Λ
        True
        >>> y = torch.tensor([[2]])  # one label per input
        >>> torch.allclose(Categorical().output_score(y, o)[0], torch.eye(3, dtype=torch.float64)[2] - p)  # e_y − p
        True
    """

    name = "categorical"
    label_ndim = 0

    def _width_hint(self) -> str:
        return "num_classes"

    def _check_width(self, width: int) -> None:
        if width < 2:
            raise TorchfimError(
                f"family 'categorical' needs at least 2 logits per input, got {width}; "
                "for a single logit use family='bernoulli'"
            )

    def _unusable_values(self, o: Tensor) -> str | None:
        """NaN or +Inf logits, or a row whose logits are all −Inf; a −Inf logit alone is a class masked out
        (probability 0: action masking, a constrained vocabulary), as ``torch.distributions.Categorical`` and
        ``F.cross_entropy`` read it."""
        if all_finite(o):
            return None
        o = o.detach()
        if bool(torch.isnan(o).any() | torch.isposinf(o).any()):
            return NON_FINITE
        if bool(torch.isneginf(o).all(-1).any()):
            return ("the model produced a row of logits that are all -inf, so no class has a probability "
                    "above 0; leave at least one class unmasked in every output")
        return None

    def check_output(self, o: Tensor) -> None:
        """The base checks, and a warning where every row is a probability vector (non-negative, summing
        to 1): a model ending in a softmax, whose outputs this family would read as logits, giving the
        Fisher of ``softmax(p)`` instead of ``p``."""
        super().check_output(o)
        if not o.numel() or not bool((o >= 0).all()):
            return
        off = float((o.detach().double().sum(-1) - 1).abs().max())  # (the penalty's outputs carry a graph)
        if off <= max(1e-5, 4 * torch.finfo(o.dtype).eps):  # a sum's rounding in the outputs' dtype
            warn_user(PROBABILITIES)

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return ()

    def _filler_label(self, o: Tensor) -> Tensor:
        return torch.zeros(o.shape[0], dtype=torch.long, device=o.device)

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        if y.dim() == 2 and y.shape[1] == o.shape[1] and not y.is_complex():
            raise TorchfimError(
                f"categorical targets must be class indices of shape (batch,), got a (batch, C) {y.dtype} tensor; "
                "pass y.argmax(dim=1) if these are one-hot labels"
            )
        if y.is_floating_point() or y.is_complex():
            raise TorchfimError(
                f"categorical targets must be integer class indices, got dtype {y.dtype}; pass y.long()"
            )
        if tuple(y.shape) != (o.shape[0],):
            raise TorchfimError(
                f"categorical targets must have shape ({o.shape[0]},) for outputs of shape "
                f"{tuple(o.shape)}, got {tuple(y.shape)}; pass one class index per input"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= o.shape[1]):
            raise TorchfimError(
                f"categorical targets must lie in [0, {o.shape[1] - 1}], got values in "
                f"[{int(y.min())}, {int(y.max())}]; check that the model has one logit per class"
            )
        y = y.to(device=o.device, dtype=torch.long)
        masked = int(o.detach().gather(-1, y.unsqueeze(-1)).isneginf().sum())
        if masked:
            warn_user(f"torchfim: {masked} of the {y.numel()} targets are classes whose logit is -inf (probability 0 "
                      "under the model, a log-likelihood of -inf); their scores are taken as autograd gives them: "
                      "check the mask or the labels")
        return y

    def _probs(self, o: Tensor) -> Tensor:
        return torch.softmax(o.to(_work_dtype(o)[0]), dim=-1)

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` class indices per input: the class whose interval of ``cumsum(p)`` holds ``U·Σp``, with ``p`` the
        softmax in the working dtype, the sum and ``U`` (uniform) in float64, so a float32 model draws the labels of its
        float64 copy from the same seed (but where ``U`` falls within float32's rounding of a boundary), and a rare class
        keeps its probability to ``2⁻⁵³``."""
        return self._draw(self._probs(o.detach()), k, generator).to(o.device)

    @staticmethod
    def _draw(p: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        # Inverse CDF: a uniform u ∈ [0, 1) scaled by the last cumulative probability picks the class
        # whose cumulative interval holds it (a class of probability 0 has an empty interval). One
        # uniform per label, where torch.multinomial draws one exponential per class. The cumulative
        # sums and u are float64 whatever p's dtype: in float32 a class of probability below 2⁻²⁴ (a
        # logit 17 below the largest) had an empty interval and was never drawn, which biased Î1 and
        # Î2 of confident inputs by up to −100%; each p keeps its own relative precision, and every class
        # now keeps its interval to float64's 2⁻⁵³, as Bernoulli's rarer label does.
        # The float64 sums are formed a few rows at a time (:data:`_CHUNK_ELEMENTS` numbers): a language model's
        # (tokens, vocabulary) probabilities would otherwise need a float64 copy twice their own size at once. The
        # uniforms are drawn first, all at once, so the labels do not depend on the chunks.
        p = _to_generator_device(p, generator)
        wide = _wide_float(p.device)
        u = torch.rand(*p.shape[:-1], k, generator=generator, dtype=wide, device=p.device)
        rows, flat_u = p.reshape(-1, p.shape[-1]), u.reshape(-1, k)
        labels = torch.empty(flat_u.shape, dtype=torch.long, device=p.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, p.shape[-1]))
        for start in range(0, rows.shape[0], step):
            cdf = rows[start:start + step].to(wide, copy=True).cumsum_(-1)
            labels[start:start + step] = torch.searchsorted(cdf, flat_u[start:start + step] * cdf[:, -1:], right=True)
        return labels.reshape(u.shape)

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        # The labels and their scores from one softmax: the same draws as sample() then output_score().
        p = self._probs(o)
        y = self._draw(p.detach(), k, generator).to(o.device).unsqueeze(-1)
        scores = p.neg().unsqueeze(-2).expand(y.shape[:-1] + p.shape[-1:]).contiguous()  # −p, k times
        return scores.scatter_add_(-1, y, torch.ones(y.shape, dtype=p.dtype, device=p.device)).to(o.dtype)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        p = self._probs(self._align(y, o))
        return (torch.nn.functional.one_hot(y, o.shape[-1]).to(p.dtype) - p).to(o.dtype)

    def fisher_output(self, o: Tensor) -> Tensor:
        p = self._probs(o)
        return (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)).to(o.dtype)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        return self.fisher_output_sqrt_columns(o, 0, o.shape[-1] - 1)

    def fisher_output_sqrt_width(self, c: int) -> int:
        return c - 1

    def fisher_output_sqrt_columns(self, o: Tensor, start: int, stop: int) -> Tensor:
        # Λ = diag(s)(I − s sᵀ)diag(s) with s = √p a unit vector (Σ p = 1), so Λ has rank C − 1 and
        # S = diag(s) Q for any orthonormal basis Q (C × (C−1)) of s⊥. Q: the Householder reflection
        # H = I − v vᵀ/(1 + s_k), v = s + e_k, maps s to −e_k, so its columns other than k span s⊥.
        # k = argmax p keeps 1 + s_k ≥ 1 + 1/√C away from 0. One column fewer means one backward
        # pass fewer in the exact Fisher. Column i of H is e_i − v·v_i/(1 + s_k): a block of columns
        # costs its own size, never the C × C of H (a language model's vocabulary).
        p = self._probs(o)
        s = p.sqrt()
        k = p.argmax(-1, keepdim=True)
        v = s.scatter_add(-1, k, torch.ones_like(k, dtype=s.dtype))
        scale = 1.0 / (1.0 + s.gather(-1, k))
        columns = torch.arange(start, stop, device=o.device)
        index = columns + (columns >= k).long()  # (B, K): the columns of H other than k
        q = torch.zeros(*s.shape, stop - start, dtype=s.dtype, device=o.device)
        q.scatter_(-2, index.unsqueeze(-2), 1.0)
        q -= v.unsqueeze(-1) * (scale * v.gather(-1, index)).unsqueeze(-2)
        return (s.unsqueeze(-1) * q).to(o.dtype)

    def _centred(self, o: Tensor, *vectors: Tensor) -> tuple[Tensor, list[Tensor], torch.dtype]:
        """``p`` (B, 1, C) and, per ``v`` (B, m, C), ``s_y = uᵀv = v_y − pᵀv`` for each label ``y``."""
        work, out = _work_dtype(o, *vectors)
        p = torch.softmax(o.to(work), dim=-1).unsqueeze(1)
        centred = [v.to(work) - (p * v.to(work)).sum(-1, keepdim=True) for v in vectors]
        return p, centred, out

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``vᵀΛw = Σ_y p_y (v_y − pᵀv)(w_y − pᵀw)`` (centred: no cancellation of large terms)."""
        p, (sv, sw), out = self._centred(o, v, w)
        return (p * sv * sw).sum(-1).to(out)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        """``G_pq = Σ_y p_y (v_py − pᵀv_p)(v_qy − pᵀv_q)``, memory linear in ``C`` per vector."""
        p, (s,), out = self._centred(o, v)
        return torch.bmm(s * p, s.transpose(1, 2)).to(out)

    def fourth_moment(self, o: Tensor) -> Tensor:
        p = self._probs(o)
        eye = torch.eye(o.shape[-1], dtype=p.dtype, device=o.device)
        d = eye - p.unsqueeze(1)  # d[n, y] = e_y − p, the score for label y
        return torch.einsum("ny,nya,nyb,nyc,nyd->nabcd", p, d, d, d, d).to(o.dtype)

    # Enumerating the C labels is cheaper than contracting the C⁴ moment tensor.
    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``Σ_y p_y (v_y − pᵀv)² (w_y − pᵀw)²``."""
        p, (sv, sw), out = self._centred(o, v, w)
        return (p * sv**2 * sw**2).sum(-1).to(out)

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """``Σ_y p_y s_py² s_qy²`` with ``s_py = v_py − pᵀv_p``: one (B, m, C) × (B, C, m) product."""
        p, (s,), out = self._centred(o, v)
        squared = s * s
        return torch.bmm(squared * p, squared.transpose(1, 2)).to(out)

    def spread_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``vᵀΛv`` and ``Var_y[s_y²]`` (``s_y = v_y − pᵀv``): the difference of :meth:`moments_along`, and centred,
        ``Σ_y p_y (s_y² − vᵀΛv)²``, for the entries where it cancels (:data:`_CANCELLED`): near uniform predictions
        with ``|s_y|`` nearly the same for every class; with two classes the form along :meth:`score_line`."""
        if o.shape[-1] == 2:
            return super().spread_along(o, v)
        work, out = _work_dtype(o, v)
        second, fourth = self.moments_along(o.to(work), v.to(work))
        spread = fourth - second.square()
        lossy = spread < fourth.mul_(_CANCELLED)
        for rows, cols in _entries(lossy, o.shape[-1]):
            spread[rows, cols] = _label_spread(o[rows], v[rows, cols], v[rows, cols]).to(work)
        return second.to(out), spread.to(out)

    def pairwise_spread(self, o: Tensor, v: Tensor) -> Tensor:
        """``Var_y[s_py s_qy]`` for every pair (``s_py = v_py − pᵀv_p``): ``Σ_y p_y s_py² s_qy² − G_pq²`` with
        ``G = fisher_output_gram``, and centred, ``Σ_y p_y (s_py s_qy − G_pq)²``, for the entries where the difference
        cancels (:data:`_CANCELLED`); with two classes the form along :meth:`score_line`. Three ``m × m`` matrices
        per input."""
        if o.shape[-1] == 2:
            return super().pairwise_spread(o, v)
        fourth = self.pairwise_moment4(o, v)
        spread = fourth - self.fisher_output_gram(o, v).square_()
        lossy = spread < fourth.mul_(_CANCELLED)
        del fourth
        for rows, first, second in _entries(lossy, o.shape[-1]):
            spread[rows, first, second] = _label_spread(o[rows], v[rows, first], v[rows, second]).to(spread.dtype)
        return spread

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # uᵀv = v_y − pᵀv for label y. One label at a time: each (B, m) slice stays in cache, which
        # is several times faster than broadcasting over (C, B, m) (v is often a class-last view of
        # class-first data, one back-propagated vector per class).
        work, out = _work_dtype(o, v)
        p = torch.softmax(o.to(work), dim=-1).T  # (C, B)
        by_label = v.to(work).permute(2, 0, 1)  # (C, B, m)
        mean = torch.einsum("cbm,cb->bm", by_label, p)
        second, fourth = torch.zeros_like(mean), torch.zeros_like(mean)
        for y in range(by_label.shape[0]):
            squared = (by_label[y] - mean).square_()
            second.addcmul_(squared, p[y].unsqueeze(-1))
            fourth.addcmul_(squared.square_(), p[y].unsqueeze(-1))
        return second.to(out), fourth.to(out)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        """``Σ_y p_y (d_yᵀ K d_y)²`` with ``d_y = e_y − p``."""
        p, quad, out = self._label_quadratics(o, k)
        return (p * quad**2).sum(-1).to(out)

    def _label_quadratics(self, o: Tensor, k: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        """``p`` (B, C), ``q_y = d_yᵀ K d_y`` for each label (B, C) with ``d_y = e_y − p``, and the output dtype."""
        work, out = _work_dtype(o, k)
        p = torch.softmax(o.to(work), dim=-1)
        d = torch.eye(o.shape[-1], dtype=work, device=o.device) - p.unsqueeze(1)
        return p, torch.einsum("nya,nab,nyb->ny", d, k.to(work), d), out

    def score_line(self, o: Tensor) -> tuple[Tensor, Tensor] | None:
        """With two classes every score is one Bernoulli score along ``e = e₀ − e₁``: ``uᵀv = s (v₀ − v₁)``,
        ``s = [y = 0] − p₀``, with ``Var(s²) = Λ tanh²((o₀ − o₁)/2)``, 0 at ``p = ½``, where the fourth moment less
        the squared second lost everything to rounding (a binary classifier near uniform predictions: negative
        variances in float32). None for more classes."""
        if o.shape[-1] != 2:
            return None
        spread, _ = Bernoulli().score_line(o[..., :1] - o[..., 1:])
        return spread, torch.tensor([1.0, -1.0], device=o.device)

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``Var_y[uᵀKu] = Σ_y p_y (q_y − q̄)²`` with ``q_y = d_yᵀKd_y``, ``d_y = e_y − p``, ``q̄ = tr ΛK``: centred, so
        that where ``q_y`` hardly depends on ``y`` (near uniform predictions) the variance is not the difference of
        ``E[q²]`` and ``q̄²``; with two classes the form along :meth:`score_line`."""
        if o.shape[-1] == 2:
            return super().score_quadratic_spread(o, k)
        p, quad, out = self._label_quadratics(o, k)
        mean = (p * quad).sum(-1, keepdim=True)
        return (p * (quad - mean).square()).sum(-1).to(out)

    def third_moment(self, o: Tensor) -> Tensor:
        """``E[u_a u_b u_c] = p_a δ_abc − p_a p_c δ_ab − p_a p_b δ_ac − p_a p_b δ_bc + 2 p_a p_b p_c``
        (the third cumulant of a one-hot vector), shape (B, C, C, C)."""
        p = self._probs(o)
        c = o.shape[-1]
        idx = torch.arange(c, device=o.device)
        outer = p.unsqueeze(-1) * p.unsqueeze(-2)  # p_a p_b
        moment = 2 * outer.unsqueeze(-1) * p[:, None, None, :]
        moment[:, idx, idx, :] -= outer  # a = b: − p_a p_c
        moment[:, idx, :, idx] -= outer.transpose(0, 1)  # a = c: − p_a p_b (indexed dim first)
        moment[:, :, idx, idx] -= outer  # b = c: − p_a p_b
        moment[:, idx, idx, idx] += p
        return moment.to(o.dtype)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """``Σ_y p_y (a_y − pᵀa)(b_y − pᵀb)(c_y − pᵀc)``, without the C³ tensor."""
        p, (sa, sb, sc), out = self._centred(o, a, b, c)
        return (p * sa * sb * sc).sum(-1).to(out)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(diag(p) − ppᵀ)`` from the secular equation in float64 (relative precision for any
        logit margin; O(B·C) work)."""
        return _fisher_top_eigenvalue(*_probabilities64(o)).to(o.dtype)

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(M)``, ``M = Σ_y p_y vec(d_y d_yᵀ) vec(d_y d_yᵀ)ᵀ = A diag(p) Aᵀ`` with columns
        ``A_y = vec(d_y d_yᵀ)``, ``d_y = e_y − p``.

        Its nonzero eigenvalues are those of the C×C matrix ``K = diag(√p) G diag(√p)``,
        ``G_yz = (AᵀA)_yz = (d_yᵀ d_z)²``: exact by a float64 eigen-solve of ``K`` for
        ``C ≤ EXACT_FOURTH_TOP_CLASSES`` (inputs in chunks of ``_CHUNK_ELEMENTS`` float64 entries);
        above, the Collatz–Wielandt upper bound from power iteration with an O(C) product by
        ``K`` (diagonal plus rank 3 plus the top class's row), which equals ``λ_max`` where the
        iteration converges and is a valid bound constant where it does not.
        """
        c = o.shape[-1]
        if c > EXACT_FOURTH_TOP_CLASSES:
            return _collatz_wielandt_bound(*_probabilities64(o)).to(o.dtype)
        tops = []
        for part in o.split(max(1, _CHUNK_ELEMENTS // (c * c))):
            p, r, q = _probabilities64(part)
            root = p.sqrt()
            k = root.unsqueeze(-1) * _score_gram_squared(p, r, q) * root.unsqueeze(-2)
            tops.append(robust_eigvalsh(k)[..., -1])
        return torch.cat(tops).to(o.dtype)

    def nll(self, o: Tensor, y: Tensor) -> Tensor:
        if o.dim() == 2 and y.shape == (o.shape[0], 1) and y.dtype == torch.long and o.dtype in _FUSED_NLL:
            # One label per input (the penalty's case): torch's fused loss, half the operations of the
            # generic log-softmax, gather and mean in each direction.
            return torch.nn.functional.cross_entropy(o, y[:, 0])
        return super().nll(o, y)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        logp = torch.log_softmax(self._align(y, o).to(_work_dtype(o)[0]), dim=-1)
        logp = logp.expand(y.shape + o.shape[-1:])
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).to(o.dtype)

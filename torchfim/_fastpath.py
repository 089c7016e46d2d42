"""Per-layer fast path for models whose trainable parameters all sit in nn.Linear / nn.Conv2d.

Instead of per-sample Jacobians through ``torch.func``, the per-sample parameter
gradients ``Jᵢᵀ v`` are assembled from each layer's input ``a`` (unfolded into
patches for a convolution) and the back-propagated output sensitivity
``g = ∂(vᵀo)/∂z`` of its pre-activation ``z``: ``∂(vᵀo)/∂W = Σ_l g_l a_lᵀ`` over the
layer's positions ``l`` and ``∂(vᵀo)/∂b = Σ_l g_l``. For a dense layer applied once
per sample (one position) the diagonal and the trace need only ``g²`` and ``a²``:
``Σᵢ (gᵢ aᵢᵀ)² = (g²)ᵀ (a²)``, so no per-sample gradient is ever built.

Second derivatives of the outputs inside a dense layer also factor:
``∂²o/∂W_ij² = a_j² ∂²o/∂z_i²`` and ``∂²o/∂b_i² = ∂²o/∂z_i²``, so the diagonals of
the output Hessians need the diagonal of ``∇²_z o`` per unit ``i`` only, one
forward-over-forward pass per unit of the layer instead of one per parameter.

Everything else (the activations between layers, pooling, reshapes, parameter-free
normalisation) is handled by autograd. Models with any other trainable module fall
back to the general path in :mod:`torchfim._functional`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vmap

from ._functional import CHUNK_ELEMENTS, FunctionalModel


@dataclass
class Recording:
    """A forward pass kept for back-propagation: outputs and every layer's input and output."""

    output: Tensor
    layer_inputs: list[Tensor]
    layer_outputs: list[Tensor]


@dataclass
class _Layer:
    """One Linear or Conv2d module and where its parameters sit in θ."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight: int | None  # index into FunctionalModel.names, None when frozen
    bias: int | None

    def patches(self, a: Tensor) -> Tensor:
        """The layer input as ``(B, L, K)`` patches, so that ``z = patches @ W.view(out, K)ᵀ``."""
        if isinstance(self.module, nn.Linear):
            return a.reshape(a.shape[0], -1, a.shape[-1])
        m = self.module
        if m.dilation != (1, 1):
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2)
        # Strided windows of the padded input, copied once into (B, K, L): faster than F.unfold on CPU.
        (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
        padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
        windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, H', W', kh, kw)
        cols = windows.permute(0, 1, 4, 5, 2, 3).reshape(a.shape[0], -1, windows.shape[2] * windows.shape[3])
        return cols.transpose(1, 2)

    def positions(self, g: Tensor) -> Tensor:
        """Output sensitivities ``(m, B, *z)`` as ``(m, B, L, out)``."""
        if isinstance(self.module, nn.Linear):
            return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
        return g.flatten(3).transpose(2, 3)

    def dense(self, a: Tensor) -> bool:
        """Whether the layer sees one vector per sample (input ``a`` of shape ``(B, in)``)."""
        return isinstance(self.module, nn.Linear) and a.dim() == 2

    def bias_sums(self, g: Tensor) -> Tensor:
        """Per-sample bias gradients ``Σ_l g_l``: ``(m, B, out)``."""
        return self.positions(g).sum(2)

    def weight_gradients(self, a: Tensor, g: Tensor, patches: Tensor | None = None) -> Iterator[tuple[slice, Tensor]]:
        """Per-sample weight gradients ``Σ_l g_l a_lᵀ`` as ``(s, m, out, K)``, a few samples ``s`` at a time.

        ``a`` is the layer input, ``g`` the sensitivities ``(m, B, *z)`` and ``patches`` (optional)
        :meth:`patches` of ``a``; yields ``(rows, gradients)``. One batched matrix product per chunk,
        the ``m`` vectors stacked, sized to stay in cache.
        """
        a = self.patches(a) if patches is None else patches
        g = self.positions(g)
        m, batch, positions, units = g.shape
        by_unit = g.transpose(2, 3)  # (m, B, out, L)
        step = max(1, _CACHE_ELEMENTS // (m * units * a.shape[-1]))
        for start in range(0, batch, step):
            rows = slice(start, min(batch, start + step))
            stacked = by_unit[:, rows].transpose(0, 1).reshape(-1, m * units, positions)
            yield rows, torch.bmm(stacked, a[rows]).view(-1, m, units, a.shape[-1])


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


class FastPath:
    """Per-sample products of a Linear/Conv2d network from layer inputs and output sensitivities."""

    def __init__(self, fm: FunctionalModel, layers: list[_Layer]) -> None:
        self.fm = fm
        self.layers = layers
        #: Only dense layers, each applied to one vector per sample: the unit-wise tricks apply.
        #: Settled by :meth:`probe` on the first batch.
        self.dense = False
        #: Per sample: elements of all layer patches, and of all sensitivities per back-propagated vector.
        self._patch_elements = 0
        self._sensitivity_elements = 0
        #: Outputs per sample (C), an upper bound on the vectors the exact Fisher back-propagates.
        self.output_width = 0

    def probe(self, x: Tensor) -> bool:
        """Whether the fast path applies to inputs like ``x`` (each layer runs once per forward)."""
        try:
            o, inputs, outputs = self._forward(x[:1])
        except _Unsupported:
            return False
        self.dense = all(layer.dense(a) for layer, a in zip(self.layers, inputs))
        self._patch_elements = sum(layer.patches(a).numel() for layer, a in zip(self.layers, inputs))
        self._sensitivity_elements = sum(z.numel() for z in outputs)
        self.output_width = o.numel()
        return True

    @classmethod
    def build(cls, fm: FunctionalModel) -> FastPath | None:
        """The fast path for ``fm``'s model, or None when some trainable parameter is not covered."""
        index = {name: i for i, name in enumerate(fm.names)}
        layers, covered = [], set()
        for name, module in fm.model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not _supported(module) or any(n not in ("weight", "bias") for n in own):
                return None
            prefix = f"{name}." if name else ""
            weight = index.get(prefix + "weight")
            bias = index.get(prefix + "bias") if module.bias is not None else None
            layers.append(_Layer(name, module, weight, bias))
            covered.update(i for i in (weight, bias) if i is not None)
        if len(covered) != len(fm.names):
            return None  # e.g. a parameter registered twice, or one used outside a module's own forward
        return cls(fm, layers)

    # ---------------------------------------------------------------- forward
    @contextmanager
    def _recording(self, record: dict[int, list[tuple[Tensor, Tensor]]], perturb: dict[int, Tensor] | None = None):
        handles = []
        for i, layer in enumerate(self.layers):

            def hook(module, args, output, i=i):
                if perturb is not None and i in perturb:
                    output = output + perturb[i]
                record.setdefault(i, []).append((args[0], output))
                return output

            handles.append(layer.module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        record: dict[int, list[tuple[Tensor, Tensor]]] = {}
        with torch.enable_grad(), self._recording(record):
            o = self.fm.model(x)
        if any(len(record.get(i, [])) != 1 for i in range(len(self.layers))):
            raise _Unsupported("a layer is used more or less than once per forward")
        inputs = [record[i][0][0].detach() for i in range(len(self.layers))]
        outputs = [record[i][0][1] for i in range(len(self.layers))]
        return o, inputs, outputs

    def record(self, x: Tensor) -> Recording:
        """A forward pass with autograd history, keeping every layer's input and output."""
        return Recording(*self._forward(x))

    def backward(self, rec: Recording, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Layer inputs and sensitivities ``(m, B, *z)`` of ``vᵀo`` for ``v`` (B, m, C).

        ``z`` is each layer's output; the ``m`` backward passes run batched through autograd (one
        plain pass when ``m = 1``).
        """
        return rec.layer_inputs, self._sensitivities(rec, v)

    def recorded_squares(self, rec: Recording, v: Tensor) -> Tensor:
        """:meth:`diag_squares` of all vectors ``v`` (B, m, C) through one recorded forward.

        The vectors go back in groups whose sensitivities stay cache-sized: with many classes,
        one pass over all of them runs several times slower per vector than groups do.
        """
        step = self._group_size(v.shape[0])
        patches = [None if layer.dense(a) else layer.patches(a) for layer, a in zip(self.layers, rec.layer_inputs)]
        total = None
        for start in range(0, v.shape[1], step):
            last = start + step >= v.shape[1]
            sens = self._sensitivities(rec, v[:, start : start + step], retain_graph=not last)
            squares = self.diag_squares(rec.layer_inputs, sens, patches)
            total = squares if total is None else total.add_(squares)
        return total

    def _sensitivities(self, rec: Recording, v: Tensor, retain_graph: bool = False) -> list[Tensor]:
        if v.shape[1] == 1:
            grads = torch.autograd.grad(rec.output, rec.layer_outputs, v[:, 0], retain_graph=retain_graph)
            grads = [g.unsqueeze(0) for g in grads]
        else:
            grad_outputs = v.transpose(0, 1).contiguous()
            try:
                grads = torch.autograd.grad(
                    rec.output, rec.layer_outputs, grad_outputs, is_grads_batched=True, retain_graph=retain_graph
                )
            except RuntimeError:  # an op without a batching rule: one backward per vector
                per_vector = [
                    torch.autograd.grad(rec.output, rec.layer_outputs, g, retain_graph=True) for g in grad_outputs
                ]
                grads = [torch.stack(gs) for gs in zip(*per_vector)]
        return list(grads)

    def sensitivities(self, x: Tensor, v: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Outputs, layer inputs and sensitivities of ``vᵀo`` (see :meth:`backward`)."""
        rec = self.record(x)
        return (rec.output.detach(), *self.backward(rec, v))

    # ------------------------------------------------------ Gram accumulation
    def per_sample_rows(self, inputs: list[Tensor], sens: list[Tensor]) -> Tensor:
        """Per-sample gradients ``Jᵢᵀ v_ij`` as rows ``(B, m, P)`` in θ order (from :meth:`backward`)."""
        pieces: dict[int, Tensor] = {}
        for layer, a, g in zip(self.layers, inputs, sens):
            if layer.weight is not None:
                pieces[layer.weight] = torch.einsum("mblo,blk->bmok", layer.positions(g), layer.patches(a)).flatten(2)
            if layer.bias is not None:
                pieces[layer.bias] = layer.bias_sums(g).transpose(0, 1)
        return torch.cat([pieces[i] for i in range(len(self.fm.names))], dim=-1)

    def diag_squares(
        self, inputs: list[Tensor], sens: list[Tensor], patches: list[Tensor | None] | None = None
    ) -> Tensor:
        """``Σᵢⱼ (Jᵢᵀ v_ij)²`` entrywise, a ``P``-vector, without per-sample gradients where possible.

        One vector per sample in a dense layer: ``Σⱼ (g_ij a_iᵀ)² = (Σⱼ g_ij²)(a_i²)ᵀ`` and the bias
        gets ``Σⱼ g_ij²``. Otherwise the per-sample gradients are built a few samples at a time.
        ``inputs`` and ``sens`` come from :meth:`backward`; ``patches`` optionally holds each
        convolution's :meth:`_Layer.patches` (None for dense layers).
        """
        out = torch.zeros(self.fm.num_params, dtype=self.fm.dtype, device=self.fm.device)
        for i, (layer, a, g) in enumerate(zip(self.layers, inputs, sens)):
            if layer.dense(a):
                g2 = g[0] ** 2 if g.shape[0] == 1 else (g**2).sum(0)  # (B, out)
                if layer.weight is not None:
                    self._slot(out, layer.weight).view(g2.shape[1], -1).addmm_(g2.T, a**2)
                if layer.bias is not None:
                    self._slot(out, layer.bias).add_(g2.sum(0))
                continue
            if layer.weight is not None:
                cached = patches[i] if patches is not None else None
                sq = sum(e.square_().sum((0, 1)) for _, e in layer.weight_gradients(a, g, cached))
                self._put(out, layer.weight, sq)
            if layer.bias is not None:
                self._put(out, layer.bias, layer.bias_sums(g).square_().sum((0, 1)))
        return out

    def sample_squares(self, inputs: list[Tensor], sens: list[Tensor]) -> Tensor:
        """``‖Jᵢᵀ v_ij‖²`` per sample and vector, shape ``(B, m)`` (from :meth:`backward`).

        Dense layers: ``‖g aᵀ‖² = ‖g‖²‖a‖²``, so nothing per-sample is built.
        """
        total = torch.zeros(sens[0].shape[1], sens[0].shape[0], dtype=self.fm.dtype, device=self.fm.device)
        for layer, a, g in zip(self.layers, inputs, sens):
            if layer.dense(a):  # weight and bias: ‖g‖² (‖a‖² + 1)
                weight = a.square().sum(-1) if layer.weight is not None else 0.0
                bias = 1.0 if layer.bias is not None else 0.0
                total += (g.square().sum(-1) * (weight + bias)).T
                continue
            if layer.weight is not None:
                for rows, e in layer.weight_gradients(a, g):
                    total[rows] += e.square_().sum((2, 3))
            if layer.bias is not None:
                total += layer.bias_sums(g).square_().sum(-1).T
        return total

    def _slot(self, out: Tensor, index: int) -> Tensor:
        """The entries of parameter ``index`` in a flat ``P``-vector (a view)."""
        start = self.fm.offsets[index]
        return out[start : start + self.fm.sizes[index]]

    def _put(self, out: Tensor, index: int, values: Tensor) -> None:
        self._slot(out, index).add_(values.reshape(-1))

    def sample_chunks(self, batch: int, vectors: int, structure: str) -> list[slice]:
        """Row chunks bounding the per-sample rows (``full``/``layers``) or patches and sensitivities."""
        if structure in ("diag", "trace"):
            per_sample = self._patch_elements + vectors * self._sensitivity_elements
        else:
            per_sample = vectors * self.fm.num_params
        step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
        return [slice(s, min(batch, s + step)) for s in range(0, batch, step)]

    def whole_batch(self, batch: int, vectors: int) -> bool:
        """Whether one recorded forward of ``batch`` samples fits :meth:`recorded_squares` of ``vectors`` vectors."""
        return len(self.sample_chunks(batch, min(vectors, self._group_size(batch)), "diag")) == 1

    def _group_size(self, batch: int) -> int:
        return max(1, _GROUP_ELEMENTS // max(1, batch * self._sensitivity_elements))

    # ----------------------------------------------- output Hessian diagonals
    def unit_hessian_diagonals(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer: its input ``a`` (B, K) and ``∂²o_a/∂z_i²`` per unit ``i``, shape ``(B, C, out)``.

        Dense layers only (:attr:`dense`). Forward-over-forward along each unit's
        direction, for all samples of the batch at once.
        """
        with torch.no_grad():
            record: dict[int, list[tuple[Tensor, Tensor]]] = {}
            with self._recording(record):
                self.fm.model(x)
        inputs = [record[i][0][0].reshape(x.shape[0], -1) for i in range(len(self.layers))]
        diagonals = []
        for i, layer in enumerate(self.layers):
            units = layer.module.weight.shape[0]
            zero = torch.zeros(x.shape[0], units, dtype=self.fm.dtype, device=self.fm.device)

            def out(delta: Tensor, i: int = i) -> Tensor:
                with self._recording({}, perturb={i: delta}):
                    return self.fm.model(x)

            def second(direction: Tensor, out: Callable[[Tensor], Tensor] = out) -> Tensor:
                def first(delta: Tensor) -> Tensor:
                    return jvp(out, (delta,), (direction,))[1]

                return jvp(first, (zero,), (direction,))[1]

            step = max(1, CHUNK_ELEMENTS // max(1, x.shape[0] * units * 16))
            cols = []
            for start in range(0, units, step):
                idx = torch.arange(start, min(units, start + step), device=self.fm.device)
                directions = torch.zeros(len(idx), x.shape[0], units, dtype=self.fm.dtype, device=self.fm.device)
                directions[torch.arange(len(idx)), :, idx] = 1
                with torch.no_grad():
                    cols.append(vmap(second)(directions))  # (m, B, C)
            diagonals.append(torch.cat(cols).permute(1, 2, 0))
        return inputs, diagonals

    def spread_units(self, inputs: list[Tensor], per_unit: list[Tensor], power: int) -> Tensor:
        """``Σᵢ t_i,unit · a_i,j^power`` for weights and ``Σᵢ t_i,unit`` for biases, as a ``P``-vector.

        ``per_unit[l]`` is ``(B, out_l)``; ``power`` is 2 for a Hessian diagonal and
        4 for its square (variances).
        """
        out = torch.zeros(self.fm.num_params, dtype=self.fm.dtype, device=self.fm.device)
        for layer, a, t in zip(self.layers, inputs, per_unit):
            if layer.weight is not None:
                self._put(out, layer.weight, t.T @ a**power)
            if layer.bias is not None:
                self._put(out, layer.bias, t.sum(0))
        return out

    def unit_columns(self, inputs: list[Tensor], sens: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per dense layer: inputs ``a`` (B, K) and ``g`` (B, out, C), the Jacobian factors ``j_W[u,j] = a_j g_u``.

        ``inputs`` and ``sens`` must come from :meth:`backward` with the ``C`` unit vectors.
        """
        return [(a, g.permute(1, 2, 0)) for a, g in zip(inputs, sens)]

    def output_gram(self, columns: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Per sample ``Jᵢ Jᵢᵀ`` (B, C, C) from :meth:`unit_columns`: ``Σ_l (‖a‖² + 1) Gᵀ G``."""
        total = 0
        for layer, (a, g) in zip(self.layers, columns):
            weight = (a**2).sum(1) if layer.weight is not None else torch.zeros_like(a[:, 0])
            bias = 1.0 if layer.bias is not None else 0.0
            total = total + torch.einsum("nuc,nud,n->ncd", g, g, weight + bias)
        return total

    def unit_traces(self, inputs: list[Tensor], diagonals: list[Tensor]) -> Tensor:
        """Per sample ``tr ∇²_θ o_a`` over the trainable parameters: ``(B, C)``."""
        total = torch.zeros(diagonals[0].shape[:2], dtype=self.fm.dtype, device=self.fm.device)
        for layer, a, d in zip(self.layers, inputs, diagonals):
            weight = (a**2).sum(1) if layer.weight is not None else torch.zeros_like(a[:, 0])
            bias = 1.0 if layer.bias is not None else 0.0
            total += torch.einsum("nau,n->na", d, weight + bias)
        return total


#: Elements of per-sample weight gradients built at once: small enough to stay in cache.
_CACHE_ELEMENTS = 2**19
#: Elements of the sensitivities of one group of vectors in :meth:`FastPath.recorded_squares`.
_GROUP_ELEMENTS = 2**22


class _Unsupported(Exception):
    """The model turned out not to fit the fast path (detected during a forward)."""


METHODS = ("auto", "functional", "layers")


def choose_path(fm: FunctionalModel, method: str, x: Tensor) -> FastPath | None:
    """The fast path for ``fm`` given its first mini-batch ``x``, or None for the torch.func path.

    ``method="auto"`` takes the fast path whenever it applies, ``"functional"``
    never; ``"layers"`` requires it.
    """
    from .errors import TorchfimError

    if method == "functional":
        return None
    fast = FastPath.build(fm)
    if fast is not None and not fast.probe(x):
        fast = None
    if fast is None and method == "layers":
        raise TorchfimError(
            "method='layers' needs every trainable parameter in an nn.Linear or nn.Conv2d (groups=1, "
            "zero padding) applied once per forward; use method='auto' to fall back to the general path"
        )
    return fast

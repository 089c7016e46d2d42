"""The one list of test models every oracle test runs (float64, seeded, tiny), and their factories.

Each case builds a model for an output width ``C`` and its inputs; ``families`` says which output
families apply (a weight-tied language model fixes ``C`` to its vocabulary, so only categorical).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.nn.utils.parametrizations import orthogonal, spectral_norm

ALL_FAMILIES = ("categorical", "bernoulli", "gaussian", "poisson")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[int], Tensor]
    families: tuple[str, ...] = ALL_FAMILIES
    positions: bool = False  # outputs (n, T, C) with a padding mask


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _floats(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tokens(n: int, length: int, vocab: int, seed: int = 1) -> Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def mlp_inputs(n: int, seed: int = 1, d_in: int = 3) -> Tensor:
    return _floats(n, d_in, seed=seed)


def cnn_inputs(n: int, seed: int = 1) -> Tensor:
    """Images ``(n, 1, 6, 6)`` for :func:`strided_cnn`."""
    return _floats(n, 1, 6, 6, seed=seed)


def tanh_mlp(c: int, seed: int = 0, d_in: int = 3, hidden: int = 4) -> nn.Module:
    _seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, c)
    ).double()


def relu_mlp(c: int, seed: int = 0) -> nn.Module:
    _seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, c)).double()


def smooth_activations(c: int) -> nn.Module:
    """SiLU, GLU and Mish: activations whose backward has no forward-mode rule, which the Hessian estimator's
    second derivatives take in composite form (Hardsigmoid has no second derivative in torch's reverse mode, which
    the oracle needs, and the eval-mode RReLU no batching rule, which the functional backend needs: both are
    tested in tests/test_composites.py)."""
    _seed()
    return nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 6), nn.GLU(), nn.Mish(), nn.Linear(3, c)).double().eval()


def strided_cnn(c: int, seed: int = 0) -> nn.Module:
    """Strided, padded conv → tanh → conv → tanh → average pool → Linear on 1×6×6 images."""
    _seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 2, dilation=1), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, c),
    ).double()


class OwnRMSNorm(nn.Module):
    """An RMSNorm of its own class, ``w ⊙ x/√(mean(x²) + eps)``: what models on a torch without ``nn.RMSNorm``
    (< 2.4) write, and torchfim's norm rule takes on probation."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


#: torch's RMSNorm where it has one, else :class:`OwnRMSNorm`.
RMS_NORM = getattr(nn, "RMSNorm", OwnRMSNorm)


def rms_norm_mlp(c: int) -> nn.Module:
    """RMSNorm (affine, weights away from 1) between Linear layers, with GELU."""
    _seed()
    model = nn.Sequential(nn.Linear(3, 5), RMS_NORM(5), nn.GELU(), nn.Linear(5, c)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model


def layer_norm_mlp(c: int) -> nn.Module:
    """LayerNorm (affine, away from its initial values) between Linear layers, with GELU."""
    _seed()
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, c)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def batchnorm1d_mlp(c: int) -> nn.Module:
    """BatchNorm1d in eval mode, running statistics away from 0 and 1."""
    _seed()
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(5, c)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def maxpool_cnn(c: int) -> nn.Module:
    """Conv → ReLU → max-pool → Linear on 1×6×6 images."""
    _seed()
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(27, c)).double()


def conv1d_net(c: int) -> nn.Module:
    _seed()
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, dilation=2), nn.Tanh(), nn.Conv1d(4, 4, 2, groups=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2, c),
    ).double()


class Encoder(nn.Module):
    """Embedding → one TransformerEncoderLayer (attention, LayerNorm) → mean pool → Linear."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, c)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(tokens)).mean(1))


def encoder(c: int) -> nn.Module:
    _seed()
    return Encoder(c).double().eval()


class Residual(nn.Module):
    """conv – BatchNorm(eval) – ReLU – conv – BatchNorm, plus the skip; then pool and Linear."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.head = nn.Linear(2, c)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean((2, 3)))


def residual_bn(c: int) -> nn.Module:
    _seed()
    model = Residual(c).double()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def group_norm(c: int) -> nn.Module:
    _seed()
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(4, c)).double()


class TiedLM(nn.Module):
    """Embedding and output layer share one weight (weight tying); classes = the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, 4, bias=True)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens).mean(1))))


def tied(c: int) -> nn.Module:
    _seed()
    return TiedLM().double()


def frozen(c: int) -> nn.Module:
    model = tanh_mlp(c)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


class Gate(nn.Module):
    """A custom module only the generic rule covers: ``x ⊙ sigmoid(s) + x² ⊙ t``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(width))
        self.t = nn.Parameter(0.3 * torch.randn(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.s) + x * x * self.t


def custom(c: int) -> nn.Module:
    _seed()
    return nn.Sequential(nn.Linear(3, 4), Gate(4), nn.Tanh(), nn.Linear(4, c)).double()


class GRUHead(nn.Module):
    """GRU over a sequence, the last hidden state to a Linear head."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, c)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def gru(c: int) -> nn.Module:
    _seed()
    return GRUHead(c).double()


class TokenModel(nn.Module):
    """A per-token model: outputs ``(n, T, C)``, each position its own observation. Its position
    embedding looks up ids ``(1, T)`` shared by every input, as Hugging Face models build them."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.position = nn.Embedding(8, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, c)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0))
        h = h + torch.tanh(self.mix(h.cumsum(1)))  # each position sees the ones before it
        return self.head(h)


def token_model(c: int) -> nn.Module:
    _seed()
    return TokenModel(c).double()


class ScaledEmbedding(nn.Embedding):
    """A lookup times ``√d`` held in a buffer, as Gemma's word embedding is: a forward of its own."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__(vocab, dim, padding_idx=0)
        self.register_buffer("embed_scale", torch.tensor(dim**0.5), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def scaled_token_model(c: int) -> nn.Module:
    """:class:`TokenModel` with a scaled word embedding (token 0 its padding row)."""
    _seed()
    model = TokenModel(c)
    model.embed = ScaledEmbedding(5, 3)
    return model.double()


def parametrized(c: int) -> nn.Module:
    """An orthogonal first layer and a spectral-normed last one (weights as functions of their originals)."""
    _seed()
    return nn.Sequential(orthogonal(nn.Linear(3, 3)), nn.Tanh(), spectral_norm(nn.Linear(3, c))).double().eval()


def hooked(c: int) -> nn.Module:
    """A pruned first layer (weight and bias) and a last one under the older spectral norm (weights set by
    forward pre-hooks from their originals; not the older weight norm: torch's fused weight norm has no
    forward-mode derivative, which the Hessian estimator needs)."""
    _seed()
    first, last = nn.Linear(3, 4), torch.nn.utils.spectral_norm(nn.Linear(4, c))
    prune.l1_unstructured(first, "weight", amount=0.4)
    prune.random_unstructured(first, "bias", amount=0.25)
    with torch.no_grad():  # the older spectral norm starts from random u, v: converge them (σ ≈ ‖W‖₂)
        for _ in range(20):
            last(torch.zeros(1, 4))
    return nn.Sequential(first, nn.Tanh(), last).double().eval()


def user_hooks(c: int) -> nn.Module:
    """Forward hooks of the user's own, as activation steering and patching set them: the first layer's
    output scaled by a hook, a steering vector added to the second layer's input by a pre-hook, and the
    last layer's output shifted by a hook that reads its call's keyword arguments (none here)."""
    _seed()
    first, second, last = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, c)
    steer = torch.randn(4, dtype=torch.float64)
    first.register_forward_hook(lambda module, args, out: 1.5 * out)
    second.register_forward_pre_hook(lambda module, args: (args[0] + steer,))
    last.register_forward_hook(lambda module, args, kwargs, out: out - 0.25, with_kwargs=True)
    return nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), last).double()


CASES = [
    Case("tanh_mlp", tanh_mlp, mlp_inputs),
    Case("relu_mlp", relu_mlp, mlp_inputs),
    Case("smooth_activations", smooth_activations, mlp_inputs),
    Case("strided_cnn", strided_cnn, cnn_inputs),
    Case("maxpool_cnn", maxpool_cnn, cnn_inputs),
    Case("conv1d", conv1d_net, lambda n: _floats(n, 2, 7)),
    Case("encoder", encoder, lambda n: _tokens(n, 4, 7), ("categorical", "gaussian")),
    Case("residual_bn", residual_bn, lambda n: _floats(n, 1, 4, 4)),
    Case("group_norm", group_norm, lambda n: _floats(n, 1, 6, 6)),
    Case("layer_norm_mlp", layer_norm_mlp, mlp_inputs),
    Case("rms_norm_mlp", rms_norm_mlp, mlp_inputs),
    Case("batchnorm1d_mlp", batchnorm1d_mlp, mlp_inputs),
    Case("tied", tied, lambda n: _tokens(n, 3, 4), ("categorical",)),
    Case("frozen", frozen, mlp_inputs),
    Case("custom", custom, mlp_inputs),
    Case("parametrized", parametrized, mlp_inputs),
    Case("hooked", hooked, mlp_inputs),
    Case("user_hooks", user_hooks, mlp_inputs),
    Case("gru", gru, lambda n: _floats(n, 3, 3), ("categorical", "gaussian")),
    Case("tokens", token_model, lambda n: _tokens(n, 3, 5), ("categorical", "gaussian"), positions=True),
    Case("scaled_tokens", scaled_token_model, lambda n: _tokens(n, 3, 5), ("categorical", "gaussian"), positions=True),
]

BY_NAME = {case.name: case for case in CASES}


def token_mask(tokens: Tensor) -> Tensor:
    """The padding mask of :func:`token_model`'s inputs: the last position of every other input is padding."""
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[::2, -1] = False
    return mask

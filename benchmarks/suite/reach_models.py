"""The models of the engine issue's table: a transformer classifier, a small ResNet, a causal LM, an LSTM.

Data are generated here (seeded tokens and images, random targets): these workloads time the
Fisher of the architecture, not of a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import Config

__all__ = ["ReachData", "transformer_classifier", "small_resnet", "causal_lm", "lstm_classifier", "reach_model",
           "OutputSequence", "LastStep"]


@dataclass
class ReachData:
    """Mini-batches of inputs, their targets, and how the floor's loss reads the outputs."""
    batches: list[Tensor]
    targets: list[Tensor]
    tokens_out: bool = False  # outputs (B, T, V) with one target per token

    @property
    def n(self) -> int:
        return sum(x.shape[0] for x in self.batches)


class TransformerClassifier(nn.Module):
    """Embedding, encoder layers (d, heads), mean over tokens, Linear to the classes."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, classes: int, causal: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, classes)
        self.causal = causal

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        mask = None
        if self.causal:
            t = tokens.shape[1]
            mask = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), diagonal=1)
        for layer in self.layers:
            h = layer(h, src_mask=mask)
        return self.head(h) if self.causal else self.head(h.mean(1))


class Block(nn.Module):
    """conv–BatchNorm–ReLU–conv–BatchNorm plus the identity."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Conv stem, residual blocks, global average pool, Linear."""

    def __init__(self, c: int, blocks: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(c) for _ in range(blocks)))
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def transformer_classifier(cfg: Config) -> tuple[nn.Module, ReachData, str]:
    """0.53 M parameters: vocabulary 1000, d=128, 4 heads, 2 layers; 256 sequences of 32 tokens."""
    vocab, d, n, t = (1000, 128, 256, 32) if not cfg.quick else (50, 16, 16, 8)
    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(vocab, d, 4 if not cfg.quick else 2, 2, 10).eval()
    x = torch.randint(0, vocab, (n, t), generator=_gen(cfg.seed + 1))
    y = torch.randint(0, 10, (n,), generator=_gen(cfg.seed + 2))
    return model, ReachData(list(x.split(cfg.batch_size)), list(y.split(cfg.batch_size))), \
        f"transformer d{d} 2 layers, {n}×{t} tokens"


def small_resnet(cfg: Config) -> tuple[nn.Module, ReachData, str]:
    """Conv stem and 2 residual blocks of 32 channels (BatchNorm in eval mode); 128 images 3×32×32."""
    c, n, side = (32, 128, 32) if not cfg.quick else (4, 8, 8)
    torch.manual_seed(cfg.seed)
    model = SmallResNet(c, 2, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(n, 3, side, side, generator=_gen(cfg.seed + 1))
    y = torch.randint(0, 10, (n,), generator=_gen(cfg.seed + 2))
    return model, ReachData(list(x.split(cfg.batch_size)), list(y.split(cfg.batch_size))), \
        f"ResNet {c}ch 2 blocks BN(eval), {n} images 3×{side}×{side}"


def causal_lm(cfg: Config) -> tuple[nn.Module, ReachData, str]:
    """2-layer causal transformer, vocabulary 1000, 16 sequences of 64 tokens, one label per token."""
    vocab, d, n, t = (1000, 128, 16, 64) if not cfg.quick else (50, 16, 4, 8)
    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(vocab, d, 4 if not cfg.quick else 2, 2, vocab, causal=True).eval()
    x = torch.randint(0, vocab, (n, t), generator=_gen(cfg.seed + 1))
    y = torch.randint(0, vocab, (n, t), generator=_gen(cfg.seed + 2))
    return model, ReachData(list(x.split(cfg.batch_size)), list(y.split(cfg.batch_size)), tokens_out=True), \
        f"causal LM d{d} 2 layers, vocab {vocab}, {n}×{t} tokens"


class OutputSequence(nn.Module):
    """A recurrent layer's output sequence (the first of its outputs)."""

    def forward(self, outputs: tuple) -> Tensor:
        return outputs[0]


class LastStep(nn.Module):
    """The last step of a batch-first sequence ``(B, T, H)``."""

    def forward(self, sequence: Tensor) -> Tensor:
        return sequence[:, -1]


def lstm_classifier(cfg: Config) -> tuple[nn.Module, ReachData, str]:
    """Embedding (vocabulary 100, 32), LSTM 32 → 64, its last step to a Linear to 10 classes; 128 sequences
    of 20 tokens. A ``Sequential``, so that BackPACK (which covers a one-layer batch-first LSTM) computes it
    with its own modules in place of :class:`OutputSequence` and :class:`LastStep`."""
    vocab, d, h, n, t = (100, 32, 64, 128, 20) if not cfg.quick else (20, 4, 6, 8, 5)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Embedding(vocab, d), nn.LSTM(d, h, batch_first=True), OutputSequence(), LastStep(),
                          nn.Linear(h, 10)).eval()
    x = torch.randint(0, vocab, (n, t), generator=_gen(cfg.seed + 1))
    y = torch.randint(0, 10, (n,), generator=_gen(cfg.seed + 2))
    return model, ReachData(list(x.split(cfg.batch_size)), list(y.split(cfg.batch_size))), \
        f"LSTM {d}→{h}, {n}×{t} tokens"


def reach_model(cfg: Config, which: str) -> tuple[nn.Module, ReachData, str]:
    """``"transformer"``, ``"resnet"``, ``"lm"`` or ``"lstm"``."""
    return {"transformer": transformer_classifier, "resnet": small_resnet, "lm": causal_lm,
            "lstm": lstm_classifier}[which](cfg)

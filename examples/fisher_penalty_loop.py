"""Train with a Fisher penalty in a plain PyTorch loop, and watch Tr(F).

``torchfim.train.FisherPenalty`` (Jastrzębski et al. 2021) returns a 0-dim tensor to add to the
task loss: by default α‖∇θ (1/B) Σᵢ −log p(ŷᵢ|xᵢ)‖² with labels ŷᵢ drawn from the model, whose
expectation is α·Tr(F)/B. Training the same network with and without it (same data, same
initialisation) shows the penalty holding Tr(F) down.

Run: python examples/fisher_penalty_loop.py   (a few seconds)
"""

import torch
from torch import nn

import torchfim
import torchfim.train

g = torch.Generator().manual_seed(0)
X = torch.randn(512, 10, generator=g)
y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()  # 3 classes


def run(alpha: float, steps: int = 100) -> float:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pen = torchfim.train.FisherPenalty(model, family="categorical", alpha=alpha, every=1,
                                       generator=torch.Generator().manual_seed(2))
    for step in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        task = nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss = task + pen(X[idx], step=step) if alpha > 0 else task
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            extra = f", penalty {float(pen.last_value):.4f}" if alpha > 0 else ""
            print(f"  alpha={alpha:<4} step {step:3d}: task loss {task.item():.4f}{extra}")
    trace = float(torchfim.fisher(model, X, structure="trace"))
    accuracy = float((model(X).argmax(1) == y).float().mean())
    print(f"  alpha={alpha:<4} done: Tr(F) = {trace:.3f}, train accuracy {100 * accuracy:.1f}%")
    return trace


plain = run(0.0)
penalised = run(1.0)
print(f"Tr(F) without the penalty {plain:.3f}, with it {penalised:.3f}")

"""docs/training.md's recipe for processes that each hold their own shard (``fisher_of_shards``), run as the page
writes it in two processes (gloo, CPU), against one process's Fisher of all the inputs (float64, to rounding)."""

from __future__ import annotations

import pytest
import torch
from doc_blocks import code_blocks
from processes import over_loopback, run_processes
from torch import nn

import torchfim

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD = 2
X = torch.randn(33, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # shards of 17 and 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _recipe() -> dict:
    """The namespace the page's block leaves: its ``fisher_of_shards``."""
    block = next(code for code in code_blocks("docs/training.md") if "def fisher_of_shards" in code)
    namespace: dict = {}
    exec(compile(block, "docs/training.md", "exec"), namespace)
    return namespace


def _rank(rank: int, root: str) -> None:
    over_loopback()
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    shard = X[rank::WORLD]
    combine = _recipe()["fisher_of_shards"]
    generator = torch.Generator().manual_seed(50 + rank)
    torch.save({
        "diag": combine(_model(), shard, len(shard)),
        "full": combine(_model(), shard, len(shard), structure="full"),
        "score": combine(_model(), shard, len(shard), estimator="score", n_samples=4, generator=generator,
                         return_stderr=True),
        "own score": torchfim.fisher(_model(), shard, estimator="score", n_samples=4,
                                     generator=torch.Generator().manual_seed(50 + rank), return_stderr=True),
    }, f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("shard_recipe")
    run_processes(_rank, (str(root),), WORLD)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_the_shards_combined_are_one_processs_exact_fisher_of_all_inputs(ranks) -> None:
    model = _model()
    want = {"diag": torchfim.fisher(model, X), "full": torchfim.fisher(model, X, structure="full")}
    for got in ranks:
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-15)


def test_a_sampled_estimate_and_its_standard_error_combine_by_the_shares(ranks) -> None:
    """``Σ_r (n_r/N) F_r`` and ``√(Σ_r (n_r/N)² se_r²)`` of each process's own estimate, on every process."""
    weights = [len(X[r::WORLD]) / len(X) for r in range(WORLD)]
    estimate = sum(w * rank["own score"][0] for w, rank in zip(weights, ranks))
    stderr = sum((w * rank["own score"][1]) ** 2 for w, rank in zip(weights, ranks)).sqrt()
    for got in ranks:
        torch.testing.assert_close(got["score"][0], estimate, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got["score"][1], stderr, rtol=1e-12, atol=1e-15)


def test_the_closed_form_variances_combine_as_the_page_says() -> None:
    """``fisher_variance`` of all the inputs is ``Σ_r (n_r/N)² V_r`` of the shards' (the page's last sentence)."""
    model = _model()
    shards = [X[r::WORLD] for r in range(WORLD)]
    combined = sum((len(s) / len(X)) ** 2 * torchfim.fisher_variance(model, s) for s in shards)
    torch.testing.assert_close(combined, torchfim.fisher_variance(model, X), rtol=1e-12, atol=1e-18)

"""A model with an operation that torch gives no forward-mode derivative: a Mixtral mixture of experts from a config,
whose experts run through ``torch._grouped_mm`` (transformers 5).

The Hessian estimator's second derivatives are taken by forward-mode AD, so every entry point that needs them refuses
the model with one ``TorchfimError`` naming the operation and the fix (before: torch's ``NotImplementedError``, since
the refusal re-raised it as the ``RuntimeError`` it subclasses), and ``torchfim report`` leaves out Î2's figures with
that reason instead of failing: its Î1 figures are the library's. The report also reads the checkpoint folder this
model's ``save_pretrained`` wrote, through ``from_pretrained`` (transformers converts the experts' saved layout).
"""

from __future__ import annotations

import clients
import pytest
import torch

import torchfim
import torchfim.report
from torchfim.engine.backend import NoForwardDerivative

transformers = clients.need("transformers")
IDS = {"input_ids": torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(0))}


def _mixtral(seed: int) -> torch.nn.Module:
    config = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=16)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("call", [
    lambda m: torchfim.fisher(m, IDS, estimator="hessian", structure="trace"),
    lambda m: torchfim.fisher_variance(m, IDS, estimator="hessian", structure="trace"),
    lambda m: torchfim.variance_bound(m, IDS, estimator="hessian", structure="diag"),
], ids=["fisher", "fisher_variance", "variance_bound"])
def test_the_hessian_estimator_names_the_operation_without_a_forward_derivative(call) -> None:
    with pytest.raises(NoForwardDerivative, match=r"forward-mode AD, which an operation of this model does not "
                                                  r"support \(.*_grouped_mm.*\); use estimator='score'"):
        call(_mixtral(0))


def test_the_report_leaves_out_the_hessian_estimators_figures_and_reads_the_folder(tmp_path) -> None:
    saved = _mixtral(1)
    saved.save_pretrained(tmp_path / "ckpt")
    model = _mixtral(2)
    res = torchfim.report.run_report(model, IDS, checkpoint=tmp_path / "ckpt", out=tmp_path / "r", progress=False,
                                     emit=None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    R = res["results"]
    assert R["mode"] == "full" and R["data"]["hessian_variances"] is False
    assert "Î2) variances were skipped" in R["data"]["variance_inputs_note"] and "_grouped_mm" in (
        res["out"] / "report.md").read_text()
    assert R["trace"]["exact"] == pytest.approx(float(torchfim.fisher(saved, IDS, structure="trace")), rel=1e-6)
    assert R["layers"][0]["subset"]["var_hessian"] is None and R["layers"][0]["subset"]["var_score"] > 0


def test_compare_estimators_chooses_the_score_estimator_and_says_why() -> None:
    """Before, the comparison failed as a whole; now Î1's figures stand, Î2's are NaN and the reason is kept."""
    model = _mixtral(0)
    cmp = torchfim.compare_estimators(model, IDS)
    score = torchfim.fisher_variance(model, IDS, estimator="score", structure="diag")
    assert cmp.hessian_unavailable is not None and "_grouped_mm" in cmp.hessian_unavailable
    assert all(r.better == "score" and r.hessian_variance != r.hessian_variance for r in cmp.rows)  # NaN
    assert sum(r.score_variance for r in cmp.rows) == pytest.approx(float(score.double().sum()), rel=1e-10)
    assert "Î2 unavailable: the Hessian estimator" in str(cmp)


class _FailsUnderTransforms(torch.nn.Module):
    """Raises ``error`` where torch.func's transforms run it (the Hessian estimator's forwards), not elsewhere."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.lin, self.error = torch.nn.Linear(3, 3), error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch._C._are_functorch_transforms_active():
            raise self.error
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x3)"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")],
                         ids=["shapes", "memory"])
def test_a_mistake_or_a_lack_of_memory_inside_a_transform_stays_what_it_is(error: Exception) -> None:
    """Only torch's words for what its transforms cannot run (a PackedSequence's wrapper tensors have no storage)
    become the refusal that compare_estimators and the report take as "no Î2 here": a shape mistake or a lack of
    memory under the same transform is raised as it is, not hidden behind the score estimator."""
    model = torch.nn.Sequential(_FailsUnderTransforms(error), torch.nn.Linear(3, 2))
    x = torch.randn(8, 3)
    with pytest.raises(type(error), match=str(error)[:20]) as raised:
        torchfim.fisher(model, x, estimator="hessian", structure="diag")
    assert not isinstance(raised.value, NoForwardDerivative)
    with pytest.raises(type(error)):
        torchfim.compare_estimators(model, x)

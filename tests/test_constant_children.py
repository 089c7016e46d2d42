"""A generic rule does not run again the sub-module calls whose outputs do not depend on its parameters.

A block with a raw parameter (a layer scale ``x + γ ⊙ f(x)``) gets the generic rule; its products
differentiate the block's forward again under ``torch.func``. The calls of its sub-modules whose outputs
do not depend on ``γ`` (all of ``f``'s layers) return their recorded outputs instead of running
(:mod:`torchfim.engine.modules.constant_children`). Spies count the sub-modules' calls made under a
``torch.func`` transform; the oracle is the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`.
"""

from __future__ import annotations

import warnings

import clients
import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional
from oracles import exact_fisher
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.constant_children import KEY, REACHED, ReplayMismatch, replaying
from torchfim.engine.per_module import PerModuleBackend


class _Block(nn.Module):
    """``x + γ ⊙ fc2(tanh(fc1(x)))`` (``scale="after"``), ``fc2(γ ⊙ tanh(fc1(x)))`` (``"middle"``) or
    ``fc2(tanh(fc1(γ ⊙ x)))`` (``"before"``); ``"in_place"`` is ``"after"`` with ``fc1``'s output doubled
    in place; ``"twice_under_transforms"`` calls ``fc1`` once more while torch.func differentiates it."""

    def __init__(self, scale: str) -> None:
        super().__init__()
        self.scale = scale
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6 if scale == "middle" else 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "before":
            return self.fc2(self.act(self.fc1(self.gamma * x)))
        h = self.fc1(x)
        if self.scale == "in_place":
            h.mul_(2.0)
        if self.scale == "twice_under_transforms" and is_functorch_wrapped_tensor(self.gamma):
            h = self.fc1(x)
        if self.scale == "middle":
            return self.fc2(self.gamma * self.act(h))
        return x + self.gamma * self.fc2(self.act(h))


def _model(scale: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Block(scale), nn.Linear(4, 3)).double()


@pytest.fixture
def linear_runs(monkeypatch) -> list[torch.Tensor]:
    """The weights of the Linear layers that ran on torch.func-wrapped inputs, one entry per run."""
    runs: list[torch.Tensor] = []
    linear = torch.nn.functional.linear

    def counting(x: torch.Tensor, weight: torch.Tensor, *args: object) -> torch.Tensor:
        if is_functorch_wrapped_tensor(x):
            runs.append(weight)
        return linear(x, weight, *args)

    monkeypatch.setattr(torch.nn.modules.linear.F, "linear", counting)
    return runs


def _constants(model: nn.Module, x: torch.Tensor) -> list[bool] | None:
    """Which of the block's recorded sub-module calls are kept as constants (None: none are)."""
    view = ModelView(model)
    backend = PerModuleBackend(view)
    recording = backend.record(next(batches(x, None, view.device, view.dtype)))
    rule = next(r for m, r in backend.rules.items() if isinstance(m, _Block))
    assert isinstance(rule, GenericRule)
    entries = next(call for r, call in recording.calls if r is rule).cache.get(KEY)
    return None if entries is None else [out is not None for _, out, _ in entries]


def _assert_equals_oracle(model: nn.Module, x: torch.Tensor, structure: str, runs: list[torch.Tensor]) -> int:
    """Assert that the Fisher equals the dense oracle; the number of Linear runs under torch.func it made."""
    full = exact_fisher(model, x, "categorical")  # (its Jacobians run the layers under torch.func too)
    runs.clear()
    got = torchfim.fisher(model, x, structure=structure)
    made = len(runs)
    assert_equals_dense(got, full, model, structure)
    return made


@pytest.mark.parametrize("structure", ["diag", "layers", "full"])
def test_a_layer_scale_block_keeps_its_layers_outputs_and_equals_the_dense_oracle(structure: str, linear_runs) -> None:
    model, x = _model("after"), torch.randn(7, 4, dtype=torch.float64)
    assert _constants(model, x) == [True, True, True]  # fc1, act, fc2
    assert _assert_equals_oracle(model, x, structure, linear_runs) == 0  # neither Linear ran again under torch.func


@pytest.mark.parametrize("estimator", ["score", "hessian", "empirical"])
def test_a_layer_scale_block_gives_every_estimator_and_variance_of_the_whole_model_backend(estimator: str) -> None:
    """The same labels (one seeded generator) through both backends: the sampled estimators, the empirical
    Fisher and the closed-form variances of the diagonal and the trace agree to rounding."""
    model, x = _model("after"), torch.randn(9, 4, dtype=torch.float64)
    assert_matches_functional(model, x, estimator, torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize(("scale", "constants", "reruns"), [("middle", [True, True, False], True),
                                                             ("before", None, True), ("in_place", [True, True, True], True)])
def test_calls_that_depend_on_the_parameters_or_were_changed_in_place_run_again(scale: str, constants, reruns,
                                                                               linear_runs) -> None:
    """γ before fc2 makes fc2's output depend on it, γ before fc1 every output; an output modified in place
    after its call is not the recorded one, so nothing is kept (checked when the products are formed)."""
    model, x = _model(scale), torch.randn(7, 4, dtype=torch.float64)
    assert _constants(model, x) == constants
    assert (_assert_equals_oracle(model, x, "diag", linear_runs) > 0) is reruns


def test_a_forward_that_calls_its_layers_otherwise_under_torch_func_runs_everything_again(linear_runs) -> None:
    model, x = _model("twice_under_transforms"), torch.randn(7, 4, dtype=torch.float64)
    assert _constants(model, x) == [True, True, True]
    assert _assert_equals_oracle(model, x, "diag", linear_runs) > 0  # the replay found fc1 called twice, and the rule ran the whole forward


class _Loop(nn.Module):
    """``h_{t+1} = tanh(W fc(h_t) + x)`` from ``h_0 = x``, three steps: fc's first call is a constant of
    ``W``'s products, its later calls are not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.W = nn.Parameter(torch.eye(4) + 0.1 * torch.arange(16.0).reshape(4, 4) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(3):
            h = torch.tanh(self.fc(h) @ self.W.T + x)
        return h


def test_a_sub_module_called_at_every_step_of_a_loop_keeps_only_its_constant_calls(linear_runs) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(_Loop(), nn.Linear(4, 3)).double(), torch.randn(7, 4, dtype=torch.float64)
    view = ModelView(model)
    backend = PerModuleBackend(view)
    recording = backend.record(next(batches(x, None, view.device, view.dtype)))
    rule = next(r for m, r in backend.rules.items() if isinstance(m, _Loop))
    entries = next(call for r, call in recording.calls if r is rule).cache[KEY]
    assert [out is not None for _, out, _ in entries] == [True, False, False]
    assert _assert_equals_oracle(model, x, "diag", linear_runs) > 0  # the two later calls ran again


class _FrozenTable(nn.Module):
    """A frozen table ``(4, 4)`` looked up whole: the same for every sample, 4 rows whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.linspace(-1.0, 1.0, 16).reshape(4, 4), requires_grad=False)

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.table)


class _Mixer(nn.Module):
    """``γ ⊙ Σ_r (x ⊙ T_r)``: a raw scale on the inputs weighted by each row of the frozen table, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.gamma = _FrozenTable(), nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * (x.unsqueeze(1) * self.table()).sum(1)


def test_an_output_every_sample_shares_is_not_cut_by_sample_when_its_rows_match_the_batch() -> None:
    """With 4 inputs the frozen table's 4 rows look like one per sample; kept and cut by sample they gave the
    wrong Fisher (the table has no autograd history, so it is run again instead)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Mixer(), nn.Linear(4, 3)).double()
    for n in (2, 4):
        x = torch.randn(n, 3, dtype=torch.float64)
        _assert_equals_oracle(model, x, "diag", [])


def test_replaying_refuses_other_calls_than_the_recorded_ones() -> None:
    parent = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    first, second = parent
    kept = torch.ones(1, 2)
    with replaying(parent, [(first, kept), (second, None)]):
        assert first(torch.zeros(1, 2)) is kept
        assert torch.equal(second(kept), torch.nn.functional.linear(kept, second.weight, second.bias))
    with pytest.raises(ReplayMismatch), replaying(parent, [(first, kept), (second, None)]):
        second(kept)
    with pytest.raises(ReplayMismatch), replaying(parent, [(first, kept), (second, None)]):
        first(kept)  # the block ends before the second call
    assert "forward" not in first.__dict__ and "forward" not in second.__dict__


def test_convnext_layers_keep_their_sub_module_outputs_and_match_the_whole_model_backend(linear_runs) -> None:
    """Hugging Face's ConvNeXt layer scales its block's output by a raw ``γ``: the generic rule of each layer
    runs none of its convolution and Linear layers again, and the Fisher is the whole-model backend's."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=16)
    model = transformers.ConvNextForImageClassification(config).double().eval()
    x = {"pixel_values": torch.randn(3, 3, 16, 16, dtype=torch.float64)}
    logits = lambda out: out.logits  # noqa: E731
    reference = torchfim.fisher(model, x, structure="diag", output=logits, backend="functional")
    linear_runs.clear()
    got = torchfim.fisher(model, x, structure="diag", output=logits)
    assert linear_runs == []
    assert torch.allclose(got, reference, rtol=1e-10, atol=1e-14 * reference.abs().max())


def test_beit_layers_run_again_only_what_follows_their_first_layer_scale(linear_runs) -> None:
    """BEiT's layers scale the attention's output by a raw ``λ₁`` (and the MLP's by ``λ₂``) and take the
    image's resolution as a ``torch.Size``: the generic rule of a layer keeps the attention's outputs (a
    tuple) and runs again only the MLP after ``λ₁``; the Fisher is the whole-model backend's."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.BeitConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     image_size=16, patch_size=8, num_labels=3, layer_scale_init_value=0.1,
                                     use_relative_position_bias=True)
    model = transformers.BeitForImageClassification(config).double().eval()
    x = {"pixel_values": torch.randn(3, 3, 16, 16, dtype=torch.float64)}
    logits = lambda out: out.logits  # noqa: E731
    reference = torchfim.fisher(model, x, structure="diag", output=logits, backend="functional")
    linear_runs.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no module falls back to one sample at a time
        got = torchfim.fisher(model, x, structure="diag", output=logits)
    assert torch.allclose(got, reference, rtol=1e-10, atol=1e-14 * reference.abs().max())
    names = {id(p): n for n, p in model.named_parameters()}
    ran = {names[id(w)] for w in linear_runs}
    assert len(ran) == 2 and not any("attention" in n for n in ran), ran  # the MLP's two (its names vary by version)


class _MaskToken(nn.Module):
    """``head(tanh(fc(s ⊙ h)))`` with ``h`` the input's first four columns; where the input has a fifth column
    (flags), the flagged rows of ``h`` are a trainable token instead: a mask that only some inputs use, as a
    speech model's spectrogram mask or a vision model's mask token is used in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.linspace(-1.0, 1.0, 4))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[..., :4]
        if x.shape[-1] == 5:
            h = torch.where(x[..., 4:] > 0, self.token, h)
        return self.head(torch.tanh(self.fc(self.scale * h)))


def _reached(model: nn.Module, x: torch.Tensor) -> frozenset[str] | None:
    """The parameters the generic rule of ``model`` (the whole model) found its call's outputs depend on,
    where not all (else None)."""
    view = ModelView(model)
    backend = PerModuleBackend(view)
    recording = backend.record(next(batches(x, None, view.device, view.dtype)))
    return next(call for r, call in recording.calls if r.module is view.model).cache.get(REACHED)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_parameters_the_outputs_do_not_depend_on_get_zeros_without_a_run(structure: str, linear_runs) -> None:
    """With the scale frozen and no flags, the model's own generic rule has only the token, which this
    forward does not use: zeros, without differentiating the model again (no Linear runs under torch.func)."""
    torch.manual_seed(0)
    model = _MaskToken().double()
    model.scale.requires_grad_(False)
    x = torch.randn(7, 4, dtype=torch.float64)
    assert _reached(model, x) == frozenset()
    assert _assert_equals_oracle(model, x, structure, linear_runs) == 0


def test_a_later_input_that_uses_the_parameter_gets_its_products(linear_runs) -> None:
    """Inputs without flags reach the scale only (the token gets zeros); flagged inputs on the same model
    (its coverage settled and kept) reach the token too, and both Fishers are the dense oracle's."""
    torch.manual_seed(0)
    model = _MaskToken().double()
    plain = torch.randn(7, 4, dtype=torch.float64)
    flagged = torch.cat([plain, (torch.arange(7.0, dtype=torch.float64) % 3 == 0).unsqueeze(1)], 1)
    assert _reached(model, plain) == frozenset({"scale"})
    _assert_equals_oracle(model, plain, "diag", linear_runs)
    assert _reached(model, flagged) is None  # all of them
    _assert_equals_oracle(model, flagged, "diag", linear_runs)
    token = torchfim.fisher(model, flagged, structure="layers")["token"]
    assert token.diagonal().min() > 0


@pytest.mark.parametrize("estimator", ["score", "hessian", "empirical"])
def test_a_partly_used_generic_rule_gives_every_estimator_and_variance_of_the_whole_model_backend(estimator: str) -> None:
    torch.manual_seed(0)
    model, x = _MaskToken().double(), torch.randn(9, 4, dtype=torch.float64)
    assert_matches_functional(model, x, estimator, torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2)))


def test_hubert_does_not_differentiate_the_whole_model_for_its_training_mask(linear_runs) -> None:
    """Hugging Face's speech models hold the spectrogram mask ``masked_spec_embed`` as a raw parameter of the
    whole model, used in training only: in eval its generic rule (the whole model's) runs no layer again,
    and the Fisher is the whole-model backend's (zero for the mask)."""
    model, x = clients.tiny_hubert()
    logits = lambda out: out.logits  # noqa: E731
    reference = torchfim.fisher(model, x, structure="layers", output=logits, backend="functional")
    linear_runs.clear()
    got = torchfim.fisher(model, x, structure="layers", output=logits)
    assert linear_runs == []
    assert got["hubert.masked_spec_embed"].abs().max() == 0
    scale = max(block.abs().max() for block in reference.values())  # the key bias's blocks are rounding (zero)
    for name, block in reference.items():
        assert torch.allclose(got[name], block, rtol=1e-10, atol=1e-14 * scale), name

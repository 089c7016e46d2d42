"""How the report presents its numbers: the Hessian estimator's labels from a subset compared like for like,
figures and legends of many layers, a layer whose Fisher is zero to precision said so, and frozen parameters
said to be left out.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchfim
from torchfim import report as report_mod


def test_the_hessian_estimators_labels_from_a_subset_are_compared_like_for_like():
    """Î2's labels per input come from a subset, extrapolated by m/n; a CLI trial's 20 of 64 heavy-tailed inputs put
    them below Î1's exact ones while Î1 extrapolated the same way needed fewer still (the ranking flipped). The
    summary gives Î1's k from the same subset (the library's fisher_variance on it, scaled by m/n), and says so
    where the subset puts Î1's variance far from its exact value."""
    from torchfim.report.markdown import _like_for_like, markdown

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    R = report_mod.compute_report(model, report_mod.Data(X, None, "test"), variance_inputs=10, progress=False)
    T, subset = R["trace"], X[R["data"]["variance_subset_indices"]]
    var_sub = T["subset"]["var_score"]
    assert var_sub == pytest.approx(float(torchfim.fisher_variance(model, subset, structure="trace")), rel=1e-6)
    want = max(1, math.ceil(var_sub * 10 / 40 / (R["rel_error"] * T["exact"]) ** 2))
    assert T["samples_needed_score_from_subset"] == want
    assert T["subset_extrapolation_ratio"] == pytest.approx(var_sub * 10 / 40 / T["var1_score_all_inputs"])
    assert f"Î1's extrapolated the same way is k = {want}, the like-for-like comparison" in markdown(R)
    skewed = {**T, "subset_extrapolation_ratio": 0.18}
    assert "The subset is not representative here: it puts Î1's variance at 0.18×" in _like_for_like(skewed, R["data"])
    assert _like_for_like(T, {**R["data"], "variance_inputs": 40}) == ""  # no subset: nothing extrapolated


def test_figures_of_many_layers_tell_them_apart():
    """A CLI trial's 52-tensor model: the legends named 12 layers without saying that 40 more were drawn, in ten
    colours that repeated; the overview's 52 names overlapped. Each layer now has its own colour, the legend says
    how many it leaves out, and a crowded overview panel numbers the layers as the tables order them."""
    from matplotlib.figure import Figure

    from torchfim.report import figures

    spectra = {f"block{j}.weight": [1.0 / (j + 1), 0.5 / (j + 1)] for j in range(30)}
    ax = Figure().add_subplot(1, 1, 1)
    figures._ax_spectrum(ax, {"spectra": spectra, "max_block": 100})
    colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in ax.get_lines()}
    assert len(colours) == 30
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == figures.LEGEND_LAYERS + 1 and texts[-1] == "+ 18 more layers, colours in layer order"
    names = list(spectra)
    crowded = Figure().add_subplot(1, 1, 1)
    figures._columns(crowded, names, compact=True, first=1)
    labels = [t.get_text() for t in crowded.get_xticklabels()]
    assert labels[0] == "1" and "block" not in "".join(labels) and "layer number" in crowded.get_xlabel()
    named = Figure().add_subplot(1, 1, 1)
    figures._columns(named, names, compact=False)
    assert [t.get_text() for t in named.get_xticklabels()] == names


def _legend_of(draw, R: dict) -> tuple[list[str], bool]:
    """The legend's texts of the panel ``draw`` draws from ``R``, and whether the legend stands right of the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax, R)
    fig.canvas.draw()
    legend = ax.get_legend()
    beside = legend.get_window_extent().x0 >= ax.get_window_extent().x1
    return [t.get_text() for t in legend.get_texts()], beside


def test_a_legend_counts_the_layers_it_draws_and_stands_beside_a_crowded_panel():
    """A review: "+ N more layers" counted the layers a panel leaves out (a shift that softmax ignores, zero to
    precision; a block whose eigenvalues are all 0), and each one left out before the twelfth took a name's place;
    the legend of 40 spectra lay over them. It now names the first 12 drawn, counts only the others drawn, and with
    more than 6 layers drawn stands right of the axes."""
    from torchfim.report import figures

    blocks = [f"block{j}.weight" for j in range(20)]
    names = ["shift", *blocks, "dead"]
    layers = [{"name": n, "zero_to_precision": n == "shift"} for n in names]
    spectra = {"shift": [1e-3], **{b: [1.0 / (j + 1), 0.5 / (j + 1)] for j, b in enumerate(blocks)}, "dead": [0.0]}
    texts, beside = _legend_of(figures._ax_spectrum, {"spectra": spectra, "max_block": 100, "layers": layers})
    assert texts == [f"{b} (2)" for b in blocks[:12]] + ["+ 8 more layers, colours in layer order"] and beside
    points = {n: {"exact": [0.0 if n == "dead" else 1e-3 * (j + 1)] * 2, "empirical": [2e-3 * (j + 1)] * 2}
              for j, n in enumerate(names)}
    R = {"empirical": {"points": points, "trace_ratio": 1.0, "cosine_diag": 1.0}, "layers": layers}
    texts, beside = _legend_of(figures._ax_empirical, R)
    assert texts == [*blocks[:12], "+ 8 more layers, colours in layer order", "y = x"] and beside
    few = {"spectra": {b: spectra[b] for b in blocks[:6]}, "max_block": 100, "layers": layers}
    texts, beside = _legend_of(figures._ax_spectrum, few)  # the default report's six: in the panel, where it fits
    assert texts == [f"{b} (2)" for b in blocks[:6]] and not beside


class _Shifted(nn.Module):
    """Logits plus one shift shared by every class: softmax ignores it, so its Fisher is 0 (in exact arithmetic)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.shift = nn.Linear(4, 5), nn.Parameter(torch.tensor([0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_layer_whose_fisher_is_zero_to_precision_is_said_so_not_reported_as_data(dtype):
    """A CLI trial's BERT key bias (softmax ignores it) came out 3.6e-26 in float32, with 3e9 labels per input, a
    full rank and a condition number reported as data. A layer whose gradients are rounding (they disagree between
    two precisions, :mod:`torchfim.report.rounding`; its Tr is at most ε²·Tr(F) here) is flagged, drawn as 0, and
    has no labels needed or spectrum; the others keep theirs."""
    from torchfim.report.markdown import markdown

    torch.manual_seed(0)
    model = _Shifted().to(dtype)
    R = report_mod.compute_report(model, report_mod.Data(torch.randn(32, 4, dtype=dtype), None, "test"),
                                  progress=False)
    by_name = {layer["name"]: layer for layer in R["layers"]}
    shift = by_name["shift"]
    assert shift["zero_to_precision"] and shift["trace_exact"] <= torch.finfo(dtype).eps ** 2 * R["trace"]["exact"]
    assert shift["samples_needed"] == {"score": None, "hessian": None} and shift["spectrum"] is None
    assert not by_name["lin.weight"]["zero_to_precision"] and by_name["lin.weight"]["spectrum"] is not None
    text = markdown(R)
    assert f"Zero to the model's {str(dtype)[6:]} precision" in text and "`shift`" in text
    assert "| `shift` | 1 | zero to precision |" in text
    # nor is it a layer where Î2 "wins" (its variance 0 against Î1's rounding-sized one): not counted, and named
    assert "Per layer, Î2 wins on 2 of 2 (" in text and "; `shift`, whose Fisher is zero to precision, not counted." in text
    from torchfim.report.terminal import summary_table

    row = next(line for line in summary_table(R).splitlines() if line.startswith("shift "))
    assert "hessian" not in row and "score" not in row  # its "lower Var Tr" cell is "–", as its k and λ_max


def test_frozen_parameters_are_said_to_be_left_out():
    """A CLI trial: a model with a frozen layer was reported as "324 trainable parameters", the 192 frozen ones
    never named, so "whole model" read as all of it."""
    from torchfim.report.markdown import markdown

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    R = report_mod.compute_report(model, report_mod.Data(torch.randn(16, 4), None, "test"), progress=False)
    assert R["model"]["n_frozen_parameters"] == 30 and R["model"]["n_parameters"] == 21
    assert "21 trainable parameters in 2 parameter tensors (\"layers\" below) (30 frozen parameters left out" in \
        markdown(R)
    model[0].requires_grad_(True)
    R = report_mod.compute_report(model, report_mod.Data(torch.randn(16, 4), None, "test"), progress=False)
    assert R["model"]["n_frozen_parameters"] == 0 and "frozen parameters left out" not in markdown(R)

"""Every ```python block of README.md and docs/*.md runs, and where its page states a result the test checks it.

Each block runs in a fresh namespace, in-process, on one thread, in a temporary working directory (the training
example writes ``trace.csv`` and ``trace.png``) with matplotlib's Agg backend. The line just before a block's fence
may hold one of these HTML comments (invisible on GitHub; parsed by tests/doc_blocks.py):

* ``<!-- continues the block above -->``: the block runs in the namespace left by the page's previous python block
  (itself run after whatever it continues);
* ``<!-- continues PAGE:N -->``: the same after block N (counted from 1) of another page, e.g. the README's
  fragments continue the set-up blocks of docs/models.md and docs/training.md, and docs/accuracy.md continues the
  README's example, whose ``model`` and ``x`` it says it uses;
* ``<!-- not run: REASON -->``: a deliberate fragment, or a block that needs what a test cannot have (a GPU,
  several processes, a user's own module); :func:`test_not_run_blocks_are_few_and_say_why` keeps them few.

A chain of blocks that another block's chain repeats word for word (the README's copies of the pages' examples) runs
once: its namespace and printed output are kept (:func:`_run`). Blocks another test runs are not run again here
(:data:`COVERED`): each names the test, and :func:`test_covered_blocks_are_run_by_the_test_named` checks that test
still reads them.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import clients  # first: hides a torchvision that cannot load, before the blocks import transformers
import pytest
import torch
from doc_blocks import ROOT, fenced

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
MAX_NOT_RUN = 3
# The optional libraries a block needs, by what its code says: missing, the block is skipped (failed under CI).
NEEDS = {"transformers": r"\btransformers\b", "tokenizers": r"\btokenizers\b", "matplotlib": r"\.plot_\w+\("}


@dataclass(frozen=True)
class Block:
    page: str
    number: int  # from 1, in the page's order
    marker: str | None  # the HTML comment on the line before the fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.number}"


def _collect() -> list[Block]:
    return [Block(page, i, marker, code) for page in PAGES
            for i, (marker, code) in enumerate(fenced((ROOT / page).read_text(encoding="utf-8")), 1)]


BLOCKS = _collect()
BY_ID = {b.id: b for b in BLOCKS}

# Blocks another test runs, and which: not run again here.
COVERED = {
    **{b.id: "tests/test_uses_doc.py::test_python_block_runs_and_passes_its_assert (each block, then its methods "
             "against a float64 oracle)" for b in BLOCKS if b.page == "docs/uses.md"},
    **{b.id: "tests/test_clients_trainer_penalty.py and tests/test_clients_trainer_processes.py, through "
             "tests/trainer_ranks.py (the recipe in a Trainer, one and two processes)"
       for b in BLOCKS if "class PenalisedTrainer(Trainer):" in b.code},
}


def _not_run_reason(block: Block) -> str | None:
    if block.marker is not None and block.marker.startswith("not run:"):
        return block.marker.removeprefix("not run:").strip()
    return None


def _chain(block: Block) -> list[Block]:
    """The blocks to run, in order, for ``block``: those it continues, then itself."""
    marker = block.marker or ""
    if marker == "continues the block above":
        assert block.number > 1, f"{block.id} continues the block above, but is the page's first"
        return [*_chain(BY_ID[f"{block.page}:{block.number - 1}"]), block]
    if match := re.fullmatch(r"continues (\S+:\d+)", marker):
        assert match[1] in BY_ID, f"{block.id} continues {match[1]}, which is not a python block"
        return [*_chain(BY_ID[match[1]]), block]
    return [block]


@dataclass
class Run:
    namespace: dict
    stdout: str


_RUNS: dict[tuple[str, ...], Run] = {}
_WORKDIR = tempfile.TemporaryDirectory(prefix="torchfim-doc-blocks-")


def _run(chain: list[Block]) -> Run:
    """The namespace and printed output of the chain's last block, run after the others; kept by the chain's code,
    so a chain repeated word for word on another page runs once. Each block gets a shallow copy of the namespace its
    predecessor left, so names it defines do not leak back (the objects are shared: a later block may train a model
    an earlier one built, and the checks below read what they need from the run they check)."""
    key = tuple(b.code for b in chain)
    if key not in _RUNS:
        namespace = dict(_run(chain[:-1]).namespace) if len(chain) > 1 else {}
        out = io.StringIO()
        with contextlib.chdir(_WORKDIR.name), contextlib.redirect_stdout(out):
            exec(compile(chain[-1].code, chain[-1].id, "exec"), namespace)
        _RUNS[key] = Run(namespace, out.getvalue())
    return _RUNS[key]


# ------------------------------------------------------------------------------- what the pages say the blocks give
def _check_readme_example(run: Run) -> None:
    """README.md's Python example: ``structure="trace"`` gives a 0-dim tensor, the score estimate comes with its
    standard error (checked loosely: within 5 s.e. of the exact trace), and the printed line says so."""
    ns = run.namespace
    assert ns["tr"].dim() == 0 and ns["est"].dim() == 0 and ns["se"].dim() == 0
    assert abs(float(ns["est"] - ns["tr"])) < 5 * float(ns["se"]) and float(ns["se"]) > 0
    assert isinstance(ns["k"], int) and ns["k"] >= 1
    printed = re.fullmatch(r"Tr\(F\) = (\S+); score estimate (\S+) ± (\S+); labels per input for a 1% s\.e\. "
                           r"of Tr\(F\): (\d+)\n", run.stdout)
    assert printed, run.stdout
    assert float(printed[1]) == pytest.approx(float(ns["tr"]), abs=1e-4) and int(printed[4]) == ns["k"]
    assert ns["torchfim"].fisher(ns["model"], ns["x"]).shape == (sum(p.numel() for p in ns["model"].parameters()),)


def _check_accuracy_example(run: Run) -> None:
    """The variances' example (README and docs/accuracy.md) on the README's Tanh network: the comments' relations
    (B ≥ V1 and Vc ≤ Var Î1, Var Î2 entry by entry, |Cov(Î1, Î2)| ≤ √(V1·V2)), and the pages' rule of which estimator
    wins: Î1 in the hidden layer of a smooth network, Î2 in the last linear layer, where its variance is exactly 0."""
    ns = run.namespace
    torchfim, model, x = ns["torchfim"], ns["model"], ns["x"]
    V1, V2, B, C12, Vc = ns["V1"], ns["V2"], ns["B"], ns["C12"], ns["Vc"]
    V2_diag = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")
    tol = 1e-6 * float(V1.max())
    assert V2.dim() == 0 and float(V2) > 0  # Var Tr Î2: the entries' covariances too, not V2_diag.sum()
    assert bool((B >= V1 - tol).all())
    assert bool((Vc <= torch.minimum(V1, V2_diag) + tol).all())
    assert bool((C12.abs() <= (V1 * V2_diag).sqrt() + tol).all())
    assert ns["est"].shape == ns["se"].shape == V1.shape
    table = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.split()[:1]
             and line.split()[0] in {"0.weight", "0.bias", "2.weight", "2.bias"}}
    assert {name: row[-1] for name, row in table.items()} == {"0.weight": "score", "0.bias": "score",
                                                               "2.weight": "hessian", "2.bias": "hessian"}
    assert float(table["2.weight"][-2]) == 0 and float(table["2.bias"][-2]) == 0  # Σ Var Î2 of the last layer


def _check_language_models(run: Run) -> None:
    """docs/models.md's language models (and the README's copy): each call gives the diagonal, a vector over the
    trainable parameters, non-negative (the score estimator's squares) and finite; the padding is left out: the
    Fisher of the masked tokens equals that of the same tokens with other ids at the padded positions."""
    ns = run.namespace
    torchfim, lm, tokens, pad_id, hf_model = ns["torchfim"], ns["lm"], ns["tokens"], ns["pad_id"], ns["hf_model"]
    F = ns["F"]
    assert F.shape == (sum(p.numel() for p in hf_model.parameters()),)
    assert bool(torch.isfinite(F).all()) and bool((F >= 0).all()) and float(F.sum()) > 0
    mask = tokens != pad_id
    other = tokens.masked_fill(~mask, pad_id + 7)

    def score(t: torch.Tensor) -> torch.Tensor:
        return torchfim.fisher(lm, t, estimator="score", mask=mask, generator=torch.Generator().manual_seed(0))

    assert not mask.all() and torch.equal(score(tokens), score(other))


def _check_training_loop(run: Run) -> None:
    """docs/training.md's loop (and the README's copy): the monitor measures every 10 steps (20 batches: steps 0 and
    10), each Tr(F) with a standard error, into trace.csv; plot_trace writes trace.png."""
    mon = run.namespace["mon"]
    assert [r.step for r in mon.history] == [0, 10]
    assert all(r.trace > 0 and 0 < r.stderr < math.inf for r in mon.history)
    rows = (Path(_WORKDIR.name) / "trace.csv").read_text().splitlines()
    assert rows[0].startswith("step,trace,stderr") and len(rows) == 1 + len(mon.history)
    assert (Path(_WORKDIR.name) / "trace.png").stat().st_size > 1_000


def _check_forecast(run: Run) -> None:
    """docs/forecast.md's example: the printed marginal and conditional errors (conditional ≤ marginal) and the
    diagnostics, and the 5-point stencil at the scanned steps agreeing with autograd's derivatives."""
    fc, fc5 = run.namespace["fc"], run.namespace["fc5"]
    assert "marginal σ" in run.stdout and "conditional σ" in run.stdout and "condition number" in run.stdout
    assert bool((fc.conditional_errors() <= fc.marginal_errors() * (1 + 1e-12)).all())
    assert torch.allclose(fc5.marginal_errors(), fc.marginal_errors(), rtol=1e-6)


CHECKS = {
    "README.md:1": _check_readme_example,
    "README.md:2": _check_accuracy_example,
    "docs/accuracy.md:1": _check_accuracy_example,
    "README.md:3": _check_language_models,
    "docs/models.md:2": _check_language_models,
    "README.md:4": _check_training_loop,
    "docs/training.md:2": _check_training_loop,
    "docs/forecast.md:1": _check_forecast,
}


# ------------------------------------------------------------------------------------------------------ the tests
@pytest.fixture
def quiet_plots():
    """matplotlib's Agg backend while a block runs (no window), its figures closed after."""
    try:
        import matplotlib
    except ImportError:
        yield
        return
    backend = matplotlib.get_backend()
    matplotlib.use("Agg")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
    matplotlib.use(backend)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, quiet_plots) -> None:
    if block.id in COVERED:
        pytest.skip(f"run by {COVERED[block.id]}")
    if (reason := _not_run_reason(block)) is not None:
        pytest.skip(f"not run: {reason}")
    chain = _chain(block)
    for module, pattern in NEEDS.items():
        if any(re.search(pattern, b.code) for b in chain):
            clients.need(module)
    run = _run(chain)
    if block.id in CHECKS:
        CHECKS[block.id](run)


def test_every_python_fence_is_collected() -> None:
    """No block escapes the collection: every line that opens a python fence (```python, ```py, ```pycon, indented
    or not) is an unindented ```python that :func:`doc_blocks.fenced` reads; and there are blocks to run."""
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        opened = re.findall(r"^[ \t]*```[ \t]*(?:python|py|pycon|python3)\b.*$", text, re.M | re.I)
        assert opened == ["```python"] * len(opened), f"{page}: {opened}"
        assert len(opened) == sum(1 for b in BLOCKS if b.page == page), page
    assert len(BLOCKS) >= 15 and len([b for b in BLOCKS if b.id not in COVERED]) >= 10


def test_a_marker_is_the_comment_on_the_line_before_the_fence() -> None:
    text = ("<!-- not run: needs a CUDA device -->\n```python\nx = 1\n```\n\n<!-- a note, then a blank line -->\n\n"
            "```python\ny = 2\n```\n```bash\nls\n```\n")
    assert fenced(text) == [("not run: needs a CUDA device", "x = 1\n"), (None, "y = 2\n")]
    assert fenced(text, "bash") == [(None, "ls\n")]


def test_markers_are_known_and_checks_name_blocks() -> None:
    """Each comment before a fence is one of the three markers; a continued block exists and chains end; each
    check names a block that runs here."""
    for block in BLOCKS:
        marker = block.marker
        assert marker is None or marker == "continues the block above" or re.fullmatch(
            r"continues \S+:\d+|not run: .+", marker), f"{block.id}: unknown marker <!-- {marker} -->"
        assert len(_chain(block)) <= 5, block.id
    for name in CHECKS:
        assert name in BY_ID and name not in COVERED and _not_run_reason(BY_ID[name]) is None, name


def test_not_run_blocks_are_few_and_say_why() -> None:
    not_run = {b.id: _not_run_reason(b) for b in BLOCKS if _not_run_reason(b) is not None}
    assert len(not_run) <= MAX_NOT_RUN, not_run
    assert all(len(reason) >= 10 for reason in not_run.values()), not_run
    for block_id in not_run:
        assert not any(b.marker and block_id in b.marker for b in BLOCKS), f"a run block continues {block_id}"


def test_covered_blocks_are_run_by_the_test_named() -> None:
    """The blocks left to other tests: docs/uses.md's, all of them, which tests/test_uses_doc.py reads through
    doc_blocks.code_blocks and runs one by one; docs/training.md's PenalisedTrainer, which tests/trainer_ranks.py
    picks out by its class line and subclasses (tests/test_clients_trainer_penalty.py trains with it)."""
    uses = (ROOT / "tests" / "test_uses_doc.py").read_text()
    assert 'DOC = Path(__file__).resolve().parents[1] / "docs" / "uses.md"' in uses
    assert "return code_blocks(DOC)" in uses and "range(len(_python_blocks()))" in uses
    ranks = (ROOT / "tests" / "trainer_ranks.py").read_text()
    assert 'code_blocks("docs/training.md")' in ranks and '"class PenalisedTrainer(Trainer):" in b' in ranks
    assert "from trainer_ranks import" in (ROOT / "tests" / "test_clients_trainer_penalty.py").read_text()
    covered_pages = {b.page for b in BLOCKS if b.id in COVERED}
    assert covered_pages == {"docs/uses.md", "docs/training.md"}
    assert sum(1 for b in BLOCKS if b.page == "docs/training.md" and b.id in COVERED) == 1

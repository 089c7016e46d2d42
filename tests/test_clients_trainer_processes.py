"""torchfim's ``Trainer`` recipe and callbacks under two processes: transformers' own ``Trainer`` launched by
``torch.distributed.run`` (``DistributedDataParallel``, gloo, CPU; tests/trainer_ranks.py is one process).

Oracles: at every step, both processes hand their optimisers the same gradient, the mean over the processes of
the gradient of ``out.loss + penalty`` computed by hand on a copy of the model at that step, on that process's
batch, with a penalty drawing from that process's generator (exact double backprop: 1e-12; the finite
difference: the O(ε) of the task gradient taken at θ + ε ĝ, 1e-6); a penalised loss through the bare model,
which the processes' gradient averaging does not see, is named by a warning. The processes share each Tr(F)
measurement: the record is the stratified combination of two monitors, each measuring one process's share of
the held inputs on copies of the model at the measured steps. A two-process run resumed from a checkpoint ends
with the uninterrupted run's parameters and records, bit for bit.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import clients
import pytest
import torch

transformers = clients.need("transformers")

import trainer_ranks as ranks  # noqa: E402

from torchfim.train import FisherTraceMonitor  # noqa: E402
from torchfim.train.monitor import DEFAULT_SEED  # noqa: E402
from torchfim.train.trainer_callback import CSV_NAME  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD = 2


def _launch(root: Path, phase: str) -> None:
    """Both processes of one phase (tests/trainer_ranks.py), with a deadline: a collective that never
    matches would hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning",
           "GLOO_SOCKET_IFNAME": "lo" if sys.platform.startswith("linux") else "lo0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(Path(ranks.__file__)), str(root), phase]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted runs, then runs resumed from checkpoint-2 of copies whose later checkpoint is gone."""
    root = tmp_path_factory.mktemp("trainer-processes")
    _launch(root, "whole")
    for method in ranks.METHODS:
        shutil.copytree(root / method / "whole", root / method / "cut")
        shutil.rmtree(root / method / "cut" / f"checkpoint-{ranks.STEPS}")  # as if the run had died after checkpoint-2
    _launch(root, "resume")
    return root


def _saved(root: Path, method: str, phase: str) -> list[dict]:
    return [torch.load(root / method / f"{phase}-{rank}.pt") for rank in range(WORLD)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", ranks.METHODS)
def test_both_processes_step_on_the_mean_of_their_penalised_gradients(runs: Path, method: str) -> None:
    first, second = _saved(runs, method, "whole")
    assert len(first["grads"]) == ranks.STEPS
    assert all(_equal(a, b) for a, b in zip(first["params"], second["params"], strict=True))
    assert all(_equal(a, b) for a, b in zip(first["grads"], second["grads"], strict=True))
    assert not any("averages no gradient" in w for w in first["warnings"] + second["warnings"])
    for saved in (first, second):  # the bare model instead of the wrapper: the drift is named
        assert any(f"averages no gradient over the {WORLD} processes" in w for w in saved["bare"])
    generators = [torch.Generator().manual_seed(3 + rank) for rank in range(WORLD)]
    tol = 1e-12 if method == "exact" else 1e-6
    for step, (params, got) in enumerate(zip(first["params"], first["grads"], strict=True)):
        per_process = []
        for rank, saved in enumerate((first, second)):
            net, batch = ranks.model_at(params), saved["batches"][step]
            term = ranks.penalty(net, "exact", rank)
            term.generator = generators[rank]
            loss = net(**batch).loss + term(batch, step=step)
            per_process.append(torch.autograd.grad(loss, list(net.parameters())))
        want = [(a + b) / WORLD for a, b in zip(*per_process, strict=True)]
        scale = max(float(w.abs().max()) for w in want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


def test_the_processes_share_each_measurement_and_the_first_writes(runs: Path) -> None:
    """Each process measures rows r::2 of the held inputs (a monitor of that share alone, generator seeded
    DEFAULT_SEED + r, measuring copies of the model at the measured steps); both record the combination."""
    first, second = _saved(runs, "exact", "whole")
    assert first["records"] == second["records"]
    steps = list(range(0, ranks.STEPS + 1, ranks.EVERY))
    shares = []
    for rank in range(WORLD):
        share = {k: v[rank::WORLD] for k, v in ranks.HELD.items()}
        alone = FisherTraceMonitor(ranks.model_at(first["params"][0]), share, generator=torch.Generator().manual_seed(DEFAULT_SEED + rank))
        for step in steps:
            alone.model = ranks.model_at(first["params"][step] if step < ranks.STEPS else first["final"])
            alone.measure(step)
        shares.append((len(share["input_ids"]), alone.history))
    total = sum(n for n, _ in shares)
    for k, (step, trace, stderr) in enumerate(first["records"]):
        assert step == steps[k]
        assert trace == pytest.approx(sum(n / total * h[k].trace for n, h in shares), rel=1e-12)
        assert stderr == pytest.approx(math.sqrt(sum((n / total * h[k].stderr) ** 2 for n, h in shares)), rel=1e-12)
    with open(runs / "exact" / "whole" / CSV_NAME, newline="") as f:
        assert [(int(row[0]), float(row[1])) for row in list(csv.reader(f))[1:]] == [r[:2] for r in first["records"]]
    checkpoint = runs / "exact" / "whole" / f"checkpoint-{ranks.SAVE}"
    monitors = [torch.load(checkpoint / f"torchfim_monitor-{rank}.pt") for rank in range(WORLD)]
    timeless = [[{k: v for k, v in row.items() if k != "seconds"} for row in m["history"]] for m in monitors]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 2
    states = [torch.load(checkpoint / f"torchfim_penalty-{rank}.pt") for rank in range(WORLD)]
    assert not torch.equal(states[0]["generator"]["state"], states[1]["generator"]["state"])  # each its own labels


@pytest.mark.parametrize("method", ranks.METHODS)
def test_a_resumed_two_process_run_ends_as_the_uninterrupted_one(runs: Path, method: str) -> None:
    whole, resumed = _saved(runs, method, "whole"), _saved(runs, method, "resume")
    for rank in range(WORLD):
        assert _equal(resumed[rank]["final"], whole[rank]["final"])
    assert all(resumed[rank]["records"] == whole[rank]["records"] for rank in range(WORLD))
    rows = [(runs / method / phase / CSV_NAME).read_text().splitlines() for phase in ("whole", "cut")]
    assert [r.split(",")[:5] for r in rows[0]] == [r.split(",")[:5] for r in rows[1]]

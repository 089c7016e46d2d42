"""One master seed per run, split into independent seeds for each source of variation.

:func:`seeds` gives every run of a study one master seed; :func:`derive_seeds` (a :class:`SeedPlan`) splits it, by
:class:`numpy.random.SeedSequence` spawning, into the seeds of the weight initialisation, the data order, the data
split, the label noise and the sampling, so that all of them vary from run to run, reproducibly; and
:func:`torch_generator` makes a ``torch.Generator`` from one of them. Re-exported by :mod:`torchfim.compare`, where
paired runs of two methods are compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._memory import available_bytes, size_text
from .errors import TorchfimError, whole_number

__all__ = ["SOURCES", "SeedPlan", "derive_seeds", "seeds", "torch_generator"]

#: Sources of variation a :class:`SeedPlan` holds one seed for, in spawn order. A new source must be
#: appended at the end, so that the seeds of the existing ones stay what they were.
SOURCES: tuple[str, ...] = ("init", "data_order", "data_split", "label_noise", "sampling")

# Spawn key of the root that :func:`seeds` spawns the runs' master seeds from ("RUNS" in ASCII).
# Keeps those seeds apart from the per-source children of SeedSequence(master_seed) that
# :func:`derive_seeds` uses (spawn keys 0..4): seeds(n, m)[k] is not derive_seeds(m)'s k-th seed.
_RUNS_SPAWN_KEY = 0x52554E53
# Bytes of memory one run's seed takes while :func:`seeds` spawns it (its SeedSequence child, the int and the list's
# slot; about 420 measured at the peak, rounded up): a count beyond the free memory hung, then ran out of it.
_BYTES_PER_SEED = 512



def _check_seed(name: str, seed: object) -> int:
    """``seed`` as an int if it is a non-negative integer (a Python or NumPy one, or a 0-dim integer tensor), else
    raise."""
    number = whole_number(seed)
    if number is None or number < 0:
        raise TorchfimError(f"{name} must be a non-negative integer, got {seed!r}")
    return number


def _check_count(n: object) -> int:
    """The number of runs of :func:`seeds` as an int: a non-negative integer whose seeds fit in the free memory."""
    count = _check_seed("n", n)
    if count < 2**20:  # under 0.5 GiB: not worth reading the free memory
        return count
    free = available_bytes(torch.device("cpu"))
    if count * _BYTES_PER_SEED > free:
        raise TorchfimError(
            f"n={count} seeds need about {size_text(count * _BYTES_PER_SEED / 2**30)} while they are spawned, but "
            f"{size_text(free / 2**30)} is available; pass n ≤ {free // _BYTES_PER_SEED:,}, or free memory"
        )
    return count


def _seed_from(sequence: np.random.SeedSequence) -> int:
    """A 32-bit seed from ``sequence``, accepted by torch, numpy (legacy too) and scikit-learn."""
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


@dataclass(frozen=True)
class SeedPlan:
    """One run's seed for each source of variation, all derived from the run's master seed.

    Build it with :func:`derive_seeds` (or ``SeedPlan.from_master``). Each field is a 32-bit
    integer (``0 <= seed < 2**32``), accepted by ``torch.manual_seed``,
    ``numpy.random.default_rng``, ``numpy.random.seed`` and scikit-learn's ``random_state``.
    The five seeds come from five children
    of ``numpy.random.SeedSequence(master_seed)``, so their streams are independent of each other,
    and the same master seed always gives the same plan.

    Attributes:
        master_seed: the run's master seed, from which the others are derived.
        init: initialisation of the model's parameters.
        data_order: order of the training examples (shuffling, mini-batch composition).
        data_split: which examples go to the train, validation and test sets.
        label_noise: which labels are corrupted, and into what, when training with label noise.
        sampling: labels drawn from the model's predictive distribution to estimate the Fisher
            information (the ``sampled`` estimators).

    >>> plan = derive_seeds(7)
    >>> plan == SeedPlan.from_master(7)
    True
    >>> len(set(plan.as_dict().values()))    # five different seeds
    5
    >>> g = plan.generator("init")           # a seeded torch.Generator for that source
    >>> torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=plan.generator("init")))
    True
    """

    master_seed: int
    init: int
    data_order: int
    data_split: int
    label_noise: int
    sampling: int

    @classmethod
    def from_master(cls, master_seed: int) -> SeedPlan:
        """The plan of the run whose master seed is ``master_seed`` (same as :func:`derive_seeds`).

        >>> SeedPlan.from_master(3).master_seed
        3
        """
        master_seed = _check_seed("master_seed", master_seed)
        children = np.random.SeedSequence(master_seed).spawn(len(SOURCES))
        return cls(master_seed, *(_seed_from(child) for child in children))

    def as_dict(self) -> dict[str, int]:
        """The seed of each source, keyed by source name (the master seed is left out).

        >>> list(derive_seeds(0).as_dict()) == list(SOURCES)
        True
        """
        seeds_by_field = asdict(self)
        return {source: seeds_by_field[source] for source in SOURCES}

    def seed(self, source: str) -> int:
        """The seed of ``source``, one of :data:`SOURCES`.

        >>> plan = derive_seeds(0)
        >>> plan.seed("data_order") == plan.data_order
        True
        """
        if not isinstance(source, str) or source not in SOURCES:
            listed = ", ".join(repr(s) for s in SOURCES)
            raise TorchfimError(f"unknown source of variation {source!r}; choose one of {listed}")
        return getattr(self, source)

    def generator(self, source: str, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh ``torch.Generator`` on ``device`` seeded with the seed of ``source``.

        >>> plan = derive_seeds(0)
        >>> plan.generator("sampling").initial_seed() == plan.sampling
        True
        """
        return torch_generator(self.seed(source), device=device)


def derive_seeds(master_seed: int) -> SeedPlan:
    """Split one run's master seed into independent seeds, one per source of variation.

    Uses ``numpy.random.SeedSequence(master_seed).spawn(5)``: child ``k`` gives the seed of
    ``SOURCES[k]``. Spawned sequences are designed to give independent streams, so e.g. changing
    the data order between runs does not tie it to the initialisation. Deterministic: the same
    master seed gives the same seeds, on every machine and numpy version (SeedSequence's hashing is
    fixed). Give both methods of a comparison the same master seed for run ``i``: their runs are
    then paired, as :func:`~torchfim.compare.prob_outperform` expects.

    Args:
        master_seed: a non-negative integer, e.g. one of :func:`seeds`.

    Returns:
        A :class:`SeedPlan`.

    >>> plan = derive_seeds(42)
    >>> plan == derive_seeds(42)                 # reproducible
    True
    >>> plan.init != plan.data_order              # one seed per source
    True
    >>> derive_seeds(43).init != plan.init        # and per run
    True
    """
    return SeedPlan.from_master(master_seed)


def seeds(n: int, master_seed: int = 0) -> list[int]:
    """``n`` master seeds, one per run, derived from one study-wide ``master_seed``.

Child ``i`` of ``numpy.random.SeedSequence(master_seed, spawn_key=(0x52554E53,)).spawn(n)``
    gives run ``i``'s seed (the spawn key, "RUNS" in ASCII, keeps these seeds apart from the
    per-source seeds ``derive_seeds(master_seed)`` spawns from the same ``master_seed``). The list
    is reproducible and a longer list extends a shorter one: ``seeds(5, s)[:3] == seeds(3, s)``.
    Each is a 32-bit integer; pass it to :func:`derive_seeds`.

    Args:
        n: number of runs, a non-negative integer whose seeds fit in memory (about 512 bytes each while spawned).
        master_seed: the study's seed, a non-negative integer.

    Returns:
        A list of ``n`` ints in ``[0, 2**32)``.

    >>> s = seeds(5, master_seed=1)
    >>> len(s), len(set(s))
    (5, 5)
    >>> seeds(3, master_seed=1) == s[:3]
    True
    >>> seeds(3, master_seed=2) != s[:3]
    True
    """
    n = _check_count(n)
    master_seed = _check_seed("master_seed", master_seed)
    root = np.random.SeedSequence(master_seed, spawn_key=(_RUNS_SPAWN_KEY,))
    return [_seed_from(child) for child in root.spawn(n)]


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A new ``torch.Generator`` on ``device``, seeded with ``seed``.

    Pass it as ``generator=`` to torch's random functions (``torch.randn``, ``torch.randperm``,
    a ``DataLoader``, ...) instead of seeding torch's global generator, so one source of
    randomness cannot shift another's stream.

    Args:
        seed: a non-negative integer below ``2**64`` (what ``torch.Generator.manual_seed`` takes), e.g. a field
            of a :class:`SeedPlan`; a larger one (a 128-bit ``SeedSequence`` entropy) is refused, naming
            :func:`derive_seeds`, which takes any size.
        device: where the generator lives (``"cpu"``, ``"cuda"``, ...); it must match the device
            of the tensors it draws.

    >>> g = torch_generator(123)
    >>> x = torch.randperm(5, generator=g)
    >>> torch.equal(x, torch.randperm(5, generator=torch_generator(123)))
    True
    >>> g.initial_seed()
    123
    """
    seed = _check_seed("seed", seed)
    if seed >= 2**64:  # torch raised a bare "Overflow when unpacking long long"
        raise TorchfimError(f"seed must be below 2**64 for a torch.Generator, got {seed}; derive 32-bit seeds from "
                            "it with derive_seeds(seed) (e.g. derive_seeds(seed).generator('init'))")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator

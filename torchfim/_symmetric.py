"""Making a running sum of symmetric terms exactly symmetric, in place.

A sum of ``rᵀr`` products is symmetric in exact arithmetic, but a matrix product rounds ``(i, j)`` and ``(j, i)``
in different orders on some CPUs, so the two triangles differ by a few units of the last place (``5e-8`` of the
largest entry in float32). :func:`torchfim.damped_solve`'s factorisations read one triangle, and its symmetry check
allows ``√eps`` of the dtype: a float64 copy of a float32 result (what a float32 refusal names) failed it.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["symmetrise_"]

#: Rows and columns of the tiles averaged at a time: two ``TILE×TILE`` temporaries, never a second ``P×P`` copy.
TILE = 1024


def symmetrise_(matrix: Tensor) -> Tensor:
    """Replace a square ``matrix`` by ``(A + Aᵀ)/2`` in place, one pair of tiles at a time; return it.

    Example:
        >>> import torch
        >>> symmetrise_(torch.tensor([[1.0, 2.0], [4.0, 3.0]]))
        tensor([[1., 3.],
                [3., 3.]])
    """
    size = matrix.shape[0]
    for i in range(0, size, TILE):
        rows = slice(i, min(size, i + TILE))
        for j in range(i, size, TILE):
            cols = slice(j, min(size, j + TILE))
            mean = (matrix[rows, cols] + matrix[cols, rows].T) / 2  # a new tensor: the diagonal tile reads itself
            matrix[rows, cols] = mean
            matrix[cols, rows] = mean.T
    return matrix

"""Spectrum utilities: retained energy and truncation perturbation of low-rank approximations.

A spectrum holds the eigenvalues ``lambda_k`` of a Gram matrix ``A^T A``, i.e. the squared
singular values ``sigma_k^2`` of ``A``, on the last axis; leading axes are batch axes. Inputs may
be numpy arrays, sequences or torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ENERGY_TOLERANCE = 1e-12
"""Round-off slack when comparing a retained energy with a threshold."""


def _as_array(x: Any) -> np.ndarray:
    """Converts ``x`` (array, sequence or tensor) to a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "double"):
            x = x.double()
    return np.asarray(x, dtype=np.float64)


def _spectrum(eigenvalues: Any) -> np.ndarray:
    """Converts and checks that there is a non-empty last axis."""
    arr = _as_array(eigenvalues)
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise ValueError(f"spectrum must have a non-empty last axis, got shape {arr.shape}")
    return arr


def _check_rank(name: str, rank: Any, dim: int) -> np.ndarray:
    """Checks that ``rank`` holds integers in ``[1, dim]``; returns it as an int array."""
    arr = np.asarray(rank)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers in [1, {dim}], got {rank!r}")
    if arr.size and (arr.min() < 1 or arr.max() > dim):
        raise ValueError(f"{name} must be integers in [1, {dim}], got {rank!r}")
    return arr.astype(np.intp)


def _check_grid(ranks: Sequence[int], dim: int) -> np.ndarray:
    """Checks a non-empty, strictly increasing 1-D grid of ranks in ``[1, dim]``."""
    arr = _check_rank("ranks", ranks, dim)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D sequence in [1, {dim}], got {ranks!r}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"ranks must be strictly increasing, got {ranks!r}")
    return arr


def _cumulative(spectrum: Any) -> np.ndarray:
    """Normalised cumulative energy with a leading zero: ``C[..., k] = sum_{j<k} lambda_j``."""
    norm = normalize_spectrum(spectrum)
    zeros = np.zeros((*norm.shape[:-1], 1))
    return np.concatenate([zeros, np.cumsum(norm, axis=-1)], axis=-1)


def _unwrap(values: np.ndarray) -> np.ndarray | float:
    """Returns a Python float for 0-d results, the array otherwise."""
    return float(values) if values.ndim == 0 else values


def normalize_spectrum(eigenvalues: Any) -> np.ndarray:
    """Sorts a spectrum descending and scales it to sum to one along the last axis.

    Negative entries (round-off of a positive semidefinite spectrum) are clipped to zero. An
    all-zero spectrum becomes uniform ``1 / d``.

    Args:
        eigenvalues: Eigenvalues on the last axis, shape ``(..., d)``.

    Returns:
        A float64 array of the same shape.

    Raises:
        ValueError: If the last axis is missing or empty.
    """
    arr = np.clip(_spectrum(eigenvalues), 0.0, None)
    arr = -np.sort(-arr, axis=-1)
    total = arr.sum(axis=-1, keepdims=True)
    dim = arr.shape[-1]
    safe_total = np.where(total > 0, total, 1.0)
    return np.where(total > 0, arr / safe_total, 1.0 / dim)


def energy_retained(spectrum: Any, rank: int) -> np.ndarray | float:
    """Fraction of energy kept by the top ``rank`` components: ``sum_{k<r} lambda_k / sum_k``.

    Args:
        spectrum: Eigenvalues on the last axis, shape ``(..., d)``.
        rank: Rank ``r`` in ``[1, d]``.

    Returns:
        A float for a 1-D spectrum, else an array of shape ``(...)``.

    Raises:
        ValueError: If ``rank`` is out of range.
    """
    cum = _cumulative(spectrum)
    r = int(_check_rank("rank", rank, cum.shape[-1] - 1))
    return _unwrap(cum[..., r])


def energy_at_ranks(spectrum: Any, ranks: Sequence[int]) -> np.ndarray:
    """Retained energy at each rank of a strictly increasing grid.

    Args:
        spectrum: Eigenvalues on the last axis, shape ``(..., d)``.
        ranks: Strictly increasing ranks in ``[1, d]``.

    Returns:
        An array of shape ``(..., len(ranks))``.

    Raises:
        ValueError: If ``ranks`` is not a valid grid.
    """
    cum = _cumulative(spectrum)
    grid = _check_grid(ranks, cum.shape[-1] - 1)
    return cum[..., grid]


def perturbation(spectrum: Any, rank_from: int, rank_to: int) -> np.ndarray | float:
    """Relative change when moving a truncated SVD from one rank to another.

    ``sqrt(sum_{min <= k < max} lambda_k / sum_k lambda_k)``, which equals
    ``||A_r - A_r'||_F / ||A||_F`` for the rank-``r`` and rank-``r'`` SVD truncations of ``A``;
    it lies in ``[0, 1]``, is symmetric in the two ranks and is zero when they are equal.

    Args:
        spectrum: Eigenvalues on the last axis, shape ``(..., d)``.
        rank_from: Rank ``r`` in ``[1, d]``.
        rank_to: Rank ``r'`` in ``[1, d]``.

    Returns:
        A float for a 1-D spectrum, else an array of shape ``(...)``.

    Raises:
        ValueError: If a rank is out of range.
    """
    cum = _cumulative(spectrum)
    dim = cum.shape[-1] - 1
    lo, hi = sorted(
        (int(_check_rank("rank_from", rank_from, dim)), int(_check_rank("rank_to", rank_to, dim)))
    )
    return _unwrap(np.sqrt(np.clip(cum[..., hi] - cum[..., lo], 0.0, None)))


def perturbation_at_ranks(
    spectrum: Any, rank_from: int | np.ndarray, ranks: Sequence[int]
) -> np.ndarray:
    """Perturbation from ``rank_from`` to each rank of a strictly increasing grid.

    Args:
        spectrum: Eigenvalues on the last axis, shape ``(..., d)``.
        rank_from: Current rank in ``[1, d]``: an int, or an integer array broadcastable to the
            leading shape ``(...)`` (one current rank per batch element).
        ranks: Strictly increasing target ranks in ``[1, d]``.

    Returns:
        An array of shape ``(..., len(ranks))``.

    Raises:
        ValueError: If a rank is out of range or ``rank_from`` does not broadcast.
    """
    cum = _cumulative(spectrum)
    dim = cum.shape[-1] - 1
    grid = _check_grid(ranks, dim)
    start = _check_rank("rank_from", rank_from, dim)
    try:
        start = np.broadcast_to(start, cum.shape[:-1])
    except ValueError as err:
        raise ValueError(
            f"rank_from must broadcast to the leading shape {cum.shape[:-1]}, "
            f"got shape {start.shape}"
        ) from err
    c_from = np.take_along_axis(cum, start[..., None], axis=-1)
    return np.sqrt(np.abs(cum[..., grid] - c_from))


def smallest_rank_for_energy(spectrum: Any, threshold: float, ranks: Sequence[int]) -> int:
    """Smallest rank of the grid that retains at least ``threshold`` of the energy.

    Args:
        spectrum: Eigenvalues of one head, shape ``(d,)``.
        threshold: Energy fraction in ``[0, 1]``.
        ranks: Strictly increasing ranks in ``[1, d]``.

    Returns:
        The smallest qualifying rank, or the largest rank of the grid if none qualifies.

    Raises:
        ValueError: If ``spectrum`` is not 1-D or an argument is out of range.
    """
    arr = _spectrum(spectrum)
    if arr.ndim != 1:
        raise ValueError(f"spectrum must be 1-D, got shape {arr.shape}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    grid = _check_grid(ranks, arr.shape[-1])
    energy = energy_at_ranks(arr, grid)
    hits = np.flatnonzero(energy >= threshold - ENERGY_TOLERANCE)
    return int(grid[hits[0]] if hits.size else grid[-1])

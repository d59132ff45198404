"""Tests for spectrum utilities against explicit truncated-SVD reconstructions."""

from __future__ import annotations

import numpy as np
import pytest

from drrl_env.spectra import (
    energy_at_ranks,
    energy_retained,
    normalize_spectrum,
    perturbation,
    perturbation_at_ranks,
    smallest_rank_for_energy,
)

CASES = [(0, 12, 8), (1, 5, 9), (2, 30, 30), (3, 7, 4), (4, 50, 16)]


def _svd(seed: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random matrix with a decaying spectrum and its thin SVD."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)) * (0.7 ** np.arange(n))
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return a, u, s, vt


def _truncate(u: np.ndarray, s: np.ndarray, vt: np.ndarray, r: int) -> np.ndarray:
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize(("seed", "m", "n"), CASES)
def test_perturbation_equals_truncation_difference(seed: int, m: int, n: int) -> None:
    a, u, s, vt = _svd(seed, m, n)
    k = s.size
    norm = np.linalg.norm(a)
    for r in range(1, k + 1):
        for r2 in range(1, k + 1):
            diff = np.linalg.norm(_truncate(u, s, vt, r) - _truncate(u, s, vt, r2)) / norm
            assert perturbation(s**2, r, r2) == pytest.approx(diff, abs=1e-10)


@pytest.mark.parametrize(("seed", "m", "n"), CASES)
def test_energy_equals_truncated_norm(seed: int, m: int, n: int) -> None:
    a, u, s, vt = _svd(seed, m, n)
    ranks = list(range(1, s.size + 1))
    expected = [np.linalg.norm(_truncate(u, s, vt, r)) ** 2 / np.linalg.norm(a) ** 2 for r in ranks]
    got = [energy_retained(s**2, r) for r in ranks]
    np.testing.assert_allclose(got, expected, atol=1e-10)
    np.testing.assert_allclose(energy_at_ranks(s**2, ranks), got, atol=1e-15)
    assert isinstance(got[0], float)
    assert got[-1] == pytest.approx(1.0)


def test_normalize_sorts_clips_and_sums_to_one() -> None:
    out = normalize_spectrum([1.0, -1e-17, 3.0, 0.0])
    np.testing.assert_allclose(out, [0.75, 0.25, 0.0, 0.0])
    assert out.dtype == np.float64
    assert out.min() >= 0.0
    batch = normalize_spectrum(np.array([[2.0, 6.0], [0.0, 0.0]]))
    np.testing.assert_allclose(batch, [[0.75, 0.25], [0.5, 0.5]])


def test_energy_is_order_invariant() -> None:
    assert energy_retained([1.0, 3.0], 1) == pytest.approx(0.75)


def test_perturbation_symmetry_and_zero() -> None:
    spec = np.random.default_rng(7).random(10)
    for r in range(1, 11):
        assert perturbation(spec, r, r) == 0.0
        for r2 in range(1, 11):
            assert perturbation(spec, r, r2) == perturbation(spec, r2, r)
            assert 0.0 <= perturbation(spec, r, r2) <= 1.0


def test_perturbation_hand_values() -> None:
    spec = [4.0, 3.0, 2.0, 1.0]
    assert perturbation(spec, 1, 3) == pytest.approx(np.sqrt(0.5))
    assert perturbation(spec, 4, 2) == pytest.approx(np.sqrt(0.3))


def test_batch_shapes() -> None:
    spec = np.random.default_rng(3).random((2, 3, 8))
    ranks = [1, 4, 8]
    assert energy_retained(spec, 4).shape == (2, 3)
    assert energy_at_ranks(spec, ranks).shape == (2, 3, 3)
    assert perturbation(spec, 2, 5).shape == (2, 3)
    assert perturbation_at_ranks(spec, 2, ranks).shape == (2, 3, 3)
    np.testing.assert_allclose(energy_at_ranks(spec, ranks)[..., 1], energy_retained(spec, 4))
    np.testing.assert_allclose(energy_at_ranks(spec, ranks)[..., -1], 1.0)


def test_perturbation_at_ranks_matches_scalar() -> None:
    spec = np.random.default_rng(5).random((2, 3, 8))
    ranks = [1, 2, 6, 8]
    start = np.array([[1, 4, 8], [2, 3, 5]])
    out = perturbation_at_ranks(spec, start, ranks)
    for i in range(2):
        for j in range(3):
            for k, r in enumerate(ranks):
                assert out[i, j, k] == pytest.approx(perturbation(spec[i, j], int(start[i, j]), r))
    per_row = perturbation_at_ranks(spec, np.array([[3], [6]]), ranks)
    np.testing.assert_allclose(per_row[1, 2], [perturbation(spec[1, 2], 6, r) for r in ranks])


def test_torch_tensor_input() -> None:
    torch = pytest.importorskip("torch")
    spec = torch.tensor([4.0, 3.0, 2.0, 1.0], requires_grad=True)
    assert energy_retained(spec, 2) == pytest.approx(0.7)
    np.testing.assert_allclose(normalize_spectrum(spec.to(torch.bfloat16)), [0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    ("threshold", "ranks", "expected"),
    [
        (0.4, [1, 2, 3, 4], 1),
        (0.7, [1, 2, 3, 4], 2),
        (0.95, [1, 2, 3, 4], 4),
        (0.0, [1, 2, 3, 4], 1),
        (1.0, [1, 2, 3, 4], 4),
        (0.4, [2, 4], 2),
        (0.7, [2, 4], 2),
        (0.95, [2, 4], 4),
        (0.95, [1, 2], 2),  # none reaches the threshold: largest rank of the grid
    ],
)
def test_smallest_rank_for_energy(threshold: float, ranks: list[int], expected: int) -> None:
    spec = normalize_spectrum([4.0, 3.0, 2.0, 1.0])
    assert smallest_rank_for_energy(spec, threshold, ranks) == expected


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True])
def test_bad_rank(bad: object) -> None:
    with pytest.raises(ValueError, match="^rank "):
        energy_retained([1.0, 2.0, 3.0, 4.0], bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("r1", "r2", "name"), [(0, 2, "rank_from"), (2, 5, "rank_to")])
def test_bad_perturbation_ranks(r1: int, r2: int, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        perturbation([1.0, 2.0, 3.0, 4.0], r1, r2)


@pytest.mark.parametrize("ranks", [[], [2, 2], [3, 1], [0, 2], [1, 5], [[1, 2]], [1.5, 2]])
def test_bad_grids(ranks: list[object]) -> None:
    spec = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="^ranks "):
        energy_at_ranks(spec, ranks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^ranks "):
        perturbation_at_ranks(spec, 1, ranks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^ranks "):
        smallest_rank_for_energy(spec, 0.5, ranks)  # type: ignore[arg-type]


def test_bad_rank_from_in_grid() -> None:
    spec = np.ones((2, 4))
    with pytest.raises(ValueError, match="^rank_from "):
        perturbation_at_ranks(spec, 0, [1, 2])
    with pytest.raises(ValueError, match="^rank_from "):
        perturbation_at_ranks(spec, np.array([1, 2, 3]), [1, 2])


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_bad_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="^threshold "):
        smallest_rank_for_energy([1.0, 2.0], threshold, [1, 2])


def test_bad_spectra() -> None:
    with pytest.raises(ValueError, match="^spectrum "):
        normalize_spectrum(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="^spectrum "):
        normalize_spectrum(1.0)
    with pytest.raises(ValueError, match="^spectrum "):
        smallest_rank_for_energy(np.ones((2, 4)), 0.5, [1, 2])

"""Executed-FLOPs accounting: the stages, full attention and the standard counts.

Each attention method counts its own executed FLOPs from these pieces
(:meth:`drrl_env.methods.AttentionMethod.flops`); this module holds what they share.
Counts multiplies and adds separately, so a ``(m x k) @ (k x n)`` matmul costs ``2 m k n``.
Shapes per head: ``T`` queries, ``N`` keys, head dimension ``d`` and rank ``r <= d``.

Standard counts used below:

* ``eigh_flops(n) = 9 n^3``: symmetric QR algorithm with eigenvectors (Golub & Van Loan,
  *Matrix Computations*, 4th ed., §8.3, "Sigma and V" for a symmetric ``n x n`` matrix).
* ``svd_flops(m, n)``: singular values and right singular vectors by Golub-Reinsch
  (Golub & Van Loan, §8.6, Fig. 8.6.1). For ``m >= n`` ("Sigma, V") it is
  ``4 m n^2 + 8 n^3``. For ``m < n`` the right singular vectors of the wide matrix are the left
  singular vectors of its ``n x m`` transpose ("Sigma, U"), costing ``4 n^2 m + 8 n m^2``.
* softmax costs ``5`` FLOPs per score (max, subtract, exp, sum, divide).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MATMUL_FLOPS_PER_MAC = 2
"""A multiply-accumulate counts as one multiply plus one add."""

SOFTMAX_FLOPS_PER_SCORE = 5
"""Row softmax per score: max, subtract, exp, sum, divide."""

EIGH_CUBIC_COEFF = 9
"""Symmetric eigendecomposition with eigenvectors: ``9 n^3`` (Golub & Van Loan, §8.3)."""

SVD_RECT_COEFF = 4
"""Golub-Reinsch SVD, rectangular term: ``4 m n^2`` for Sigma, V (Golub & Van Loan, §8.6)."""

SVD_CUBIC_COEFF = 8
"""Golub-Reinsch SVD, cubic term: ``8 n^3`` for Sigma, V (Golub & Van Loan, §8.6)."""


@dataclass(frozen=True)
class FlopsBreakdown:
    """Executed FLOPs of one attention call, split by stage.

    Attributes:
        features: Cost of what the observation shows before the decision (the spectrum:
            Gram updates and eigendecompositions, or rotating new keys and their energies);
            paid at every call, whatever the setting.
        subspace: Cost of computing a basis after the decision (the ``svd`` method's SVDs).
        projections: Cost of projecting queries and keys onto the basis.
        selection: Cost of choosing the keys a sparse method attends (one per score).
        scores: Cost of the query-key score matmuls (selection scores included).
        softmax: Cost of the row softmax over the scores.
        output: Cost of the attention-weights-times-values matmul.
    """

    features: int = 0
    subspace: int = 0
    projections: int = 0
    selection: int = 0
    scores: int = 0
    softmax: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        """Sum of all stages."""
        return sum(asdict(self).values())

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        if not isinstance(other, FlopsBreakdown):
            return NotImplemented
        mine, theirs = asdict(self), asdict(other)
        return FlopsBreakdown(**{stage: mine[stage] + theirs[stage] for stage in mine})

    def scaled(self, factor: int) -> FlopsBreakdown:
        """Every stage multiplied by ``factor`` (e.g. a batch of identical problems)."""
        return FlopsBreakdown(**{stage: value * factor for stage, value in asdict(self).items()})

    def __radd__(self, other: object) -> FlopsBreakdown:
        # Lets ``sum(breakdowns)`` start from the integer 0.
        if other == 0:
            return self
        return NotImplemented

    def as_dict(self) -> dict[str, int]:
        """Returns the stages and the total as a plain dict."""
        return {**asdict(self), "total": self.total}


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Validates that ``value`` is an int in ``[low, high]`` (``high=None``: unbounded)."""
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {allowed}, got {value}")
    return value


def eigh_flops(n: int) -> int:
    """FLOPs of a symmetric ``n x n`` eigendecomposition with eigenvectors: ``9 n^3``."""
    _check_int("n", n, 1)
    return EIGH_CUBIC_COEFF * n**3


def svd_flops(m: int, n: int) -> int:
    """FLOPs of singular values and right singular vectors of an ``m x n`` matrix.

    Args:
        m: Number of rows.
        n: Number of columns.

    Returns:
        ``4 m n^2 + 8 n^3`` if ``m >= n``, else ``4 n^2 m + 8 n m^2`` (via the transpose).
    """
    _check_int("m", m, 1)
    _check_int("n", n, 1)
    if m >= n:
        return SVD_RECT_COEFF * m * n**2 + SVD_CUBIC_COEFF * n**3
    return SVD_RECT_COEFF * n**2 * m + SVD_CUBIC_COEFF * n * m**2


def _core_flops(queries: int, keys: int, head_dim: int, inner: int) -> FlopsBreakdown:
    """Scores at inner dimension ``inner``, softmax and ``A V`` for one query head."""
    return FlopsBreakdown(
        scores=MATMUL_FLOPS_PER_MAC * queries * keys * inner,
        softmax=SOFTMAX_FLOPS_PER_SCORE * queries * keys,
        output=MATMUL_FLOPS_PER_MAC * queries * keys * head_dim,
    )


def full_attention_flops(queries: int, keys: int, head_dim: int, heads: int = 1) -> FlopsBreakdown:
    """Executed FLOPs of full attention: scores ``2TNd``, softmax ``5TN``, output ``2TNd``.

    Args:
        queries: Number of queries ``T``.
        keys: Number of keys ``N``.
        head_dim: Head dimension ``d``.
        heads: Number of query heads.

    Returns:
        The breakdown summed over ``heads``.

    Raises:
        ValueError: If an argument is not a positive int.
    """
    _check_shape(queries, keys, head_dim, heads)
    return _core_flops(queries, keys, head_dim, head_dim).scaled(heads)


def _check_shape(queries: int, keys: int, head_dim: int, heads: int) -> None:
    """Validates that the attention shape arguments are positive ints."""
    shape = {"queries": queries, "keys": keys, "head_dim": head_dim, "heads": heads}
    for name, value in shape.items():
        _check_int(name, value, 1)


def attention_core_saving_bound(head_dim: int, rank: int) -> float:
    """Upper bound ``(d - r) / (2 d)`` on the saving of the two attention matmuls.

    Full attention spends ``2TNd`` on the scores and ``2TNd`` on ``A V``. Low rank shrinks only
    the scores to ``2TNr``, because ``A V`` still multiplies by the ``d``-dimensional values.
    The matmul saving is therefore ``2TN(d - r) / 4TNd = (d - r) / (2d)``, below one half at
    any rank. Projections and basis computation only add FLOPs, so no method saves more.

    Args:
        head_dim: Head dimension ``d``.
        rank: Rank ``r`` in ``[1, head_dim]``.

    Returns:
        The fraction of the score-plus-output FLOPs that low rank can save.

    Raises:
        ValueError: If an argument is out of range.
    """
    _check_int("head_dim", head_dim, 1)
    _check_int("rank", rank, 1, head_dim)
    return (head_dim - rank) / (2 * head_dim)


def flops_ratio(lowrank: FlopsBreakdown, full: FlopsBreakdown) -> float:
    """Total FLOPs of ``lowrank`` relative to ``full``.

    Raises:
        ValueError: If ``full`` has no FLOPs.
    """
    if full.total <= 0:
        raise ValueError(f"full must have a positive total, got {full.total}")
    return lowrank.total / full.total

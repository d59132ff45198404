"""Executed-FLOPs accounting for full and low-rank multi-head attention.

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

METHODS = ("full", "svd", "gram", "calibrated")
"""Ways of choosing the rank-``r`` basis: none, truncated SVDs, Gram eigenbasis, fixed."""


@dataclass(frozen=True)
class FlopsBreakdown:
    """Executed FLOPs of one attention call, split by stage.

    Attributes:
        subspace: Cost of computing the low-rank basis (Gram matrices, eigh, SVD).
        projections: Cost of projecting queries and keys onto the basis.
        scores: Cost of the query-key score matmul.
        softmax: Cost of the row softmax over the scores.
        output: Cost of the attention-weights-times-values matmul.
    """

    subspace: int = 0
    projections: int = 0
    scores: int = 0
    softmax: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        """Sum of all stages."""
        return self.subspace + self.projections + self.scores + self.softmax + self.output

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        if not isinstance(other, FlopsBreakdown):
            return NotImplemented
        return FlopsBreakdown(
            subspace=self.subspace + other.subspace,
            projections=self.projections + other.projections,
            scores=self.scores + other.scores,
            softmax=self.softmax + other.softmax,
            output=self.output + other.output,
        )

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


def _scale(b: FlopsBreakdown, factor: int) -> FlopsBreakdown:
    """Multiplies every stage of ``b`` by ``factor``."""
    return FlopsBreakdown(**{k: v * factor for k, v in asdict(b).items()})


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
    return _scale(_core_flops(queries, keys, head_dim, head_dim), heads)


def _gram_flops(t: int, n: int, d: int, r: int, n_new: int, heads: int, kv: int) -> FlopsBreakdown:
    """Gram-eigenbasis method: ``Q^T Q + K^T K`` per query head, ``K^T K`` updated per kv head."""
    mac = MATMUL_FLOPS_PER_MAC
    per_q_subspace = mac * t * d * d + d * d + eigh_flops(d)
    per_kv_subspace = mac * n_new * d * d
    per_q_proj = mac * t * d * r + mac * n * d * r
    return FlopsBreakdown(
        subspace=heads * per_q_subspace + kv * per_kv_subspace,
        projections=heads * per_q_proj,
    )


def _svd_flops_method(t: int, n: int, d: int, r: int, heads: int, kv: int) -> FlopsBreakdown:
    """Separate truncated SVDs: ``(Q V_q)(V_q^T V_k)(K V_k)^T`` with key basis per kv head."""
    mac = MATMUL_FLOPS_PER_MAC
    per_q_subspace = svd_flops(t, d) + mac * r * d * r
    per_q_proj = mac * t * d * r + mac * t * r * r
    return FlopsBreakdown(
        subspace=heads * per_q_subspace + kv * svd_flops(n, d),
        projections=heads * per_q_proj + kv * mac * n * d * r,
    )


def _calibrated_flops(t: int, n: int, d: int, r: int, heads: int) -> FlopsBreakdown:
    """Fixed offline basis: no subspace work, queries and keys projected per query head."""
    mac = MATMUL_FLOPS_PER_MAC
    return FlopsBreakdown(projections=heads * (mac * t * d * r + mac * n * d * r))


def _check_shape(queries: int, keys: int, head_dim: int, heads: int) -> None:
    """Validates that the attention shape arguments are positive ints."""
    shape = {"queries": queries, "keys": keys, "head_dim": head_dim, "heads": heads}
    for name, value in shape.items():
        _check_int(name, value, 1)


def _resolve_kv_heads(heads: int, kv_heads: int | None) -> int:
    """Validates ``kv_heads`` (default ``heads``) as a divisor of ``heads``."""
    kv = heads if kv_heads is None else _check_int("kv_heads", kv_heads, 1, heads)
    if heads % kv != 0:
        raise ValueError(f"kv_heads must divide heads={heads}, got {kv}")
    return kv


def lowrank_attention_flops(
    queries: int,
    keys: int,
    head_dim: int,
    rank: int,
    method: str,
    heads: int = 1,
    kv_heads: int | None = None,
    new_keys: int | None = None,
) -> FlopsBreakdown:
    """Executed FLOPs of low-rank attention, the cost of finding the basis included.

    Scores are computed at inner dimension ``rank`` after projecting queries and keys on an
    orthonormal ``d x r`` basis; ``A V`` stays at full head dimension. With ``method="full"`` or
    ``rank == head_dim`` the kernel runs full attention and the count equals
    :func:`full_attention_flops`.

    Args:
        queries: Number of queries ``T``.
        keys: Number of keys ``N``.
        head_dim: Head dimension ``d``.
        rank: Rank ``r`` in ``[1, head_dim]``.
        method: One of :data:`METHODS`.
        heads: Number of query heads.
        kv_heads: Number of key/value heads shared by the query heads (default ``heads``).
        new_keys: Keys added since the previous call, for the incrementally accumulated key
            Gram of ``method="gram"``; ``None`` means all ``keys``.

    Returns:
        The breakdown summed over heads.

    Raises:
        ValueError: If an argument is out of range; the message names it.
    """
    _check_shape(queries, keys, head_dim, heads)
    _check_int("rank", rank, 1, head_dim)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kv = _resolve_kv_heads(heads, kv_heads)
    n_new = keys if new_keys is None else _check_int("new_keys", new_keys, 0, keys)
    if method == "full" or rank == head_dim:
        return full_attention_flops(queries, keys, head_dim, heads)
    core = _scale(_core_flops(queries, keys, head_dim, rank), heads)
    if method == "gram":
        extra = _gram_flops(queries, keys, head_dim, rank, n_new, heads, kv)
    elif method == "svd":
        extra = _svd_flops_method(queries, keys, head_dim, rank, heads, kv)
    else:
        extra = _calibrated_flops(queries, keys, head_dim, rank, heads)
    return core + extra


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

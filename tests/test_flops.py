"""The shared FLOPs counts against hand counts (each method's own count: test_methods.py)."""

from __future__ import annotations

import pytest

from drrl_env.flops import (
    FlopsBreakdown,
    attention_core_saving_bound,
    eigh_flops,
    flops_ratio,
    full_attention_flops,
    svd_flops,
)
from drrl_env.methods import make_method
from drrl_env.methods.base import CallShape, Setting


def lowrank_attention_flops(queries, keys, head_dim, rank, method, heads=1, kv_heads=None):
    """A method's executed FLOPs at ``rank`` on one call of this shape."""
    shape = CallShape(queries, keys, head_dim, heads, kv_heads or heads)
    return make_method(method, head_dim, 1).flops(shape, Setting(rank))


# Small concrete shapes: T=4 queries, N=6 keys, d=8, r=2, 2 query heads sharing 1 kv head.
T, N, D, R, H, KV = 4, 6, 8, 2, 2, 1


def test_standard_counts() -> None:
    assert eigh_flops(8) == 9 * 8 * 8 * 8
    assert svd_flops(6, 4) == 4 * 6 * 4 * 4 + 8 * 4 * 4 * 4
    # Wide matrix: Sigma, U of the 8 x 4 transpose.
    assert svd_flops(4, 8) == 4 * 8 * 8 * 4 + 8 * 8 * 4 * 4


def test_full_hand_count() -> None:
    b = full_attention_flops(T, N, D, heads=H)
    assert b == FlopsBreakdown(
        scores=2 * (2 * 4 * 6 * 8),
        softmax=2 * (5 * 4 * 6),
        output=2 * (2 * 4 * 6 * 8),
    )
    assert b.total == 768 + 240 + 768


def test_breakdown_sum_and_dict() -> None:
    a = full_attention_flops(T, N, D)
    b = lowrank_attention_flops(T, N, D, R, "gram")
    s = a + b
    assert s.total == a.total + b.total
    assert sum([a, b]) == s
    d = s.as_dict()
    assert d["total"] == s.total
    assert set(d) == {
        "features", "subspace", "projections", "selection", "scores", "softmax", "output", "total"
    }  # fmt: skip
    assert a.scaled(3).total == 3 * a.total
    with pytest.raises(TypeError):
        _ = a + 1


@pytest.mark.parametrize(("rank", "expected"), [(16, 0.375), (32, 0.25), (64, 0.0), (1, 63 / 128)])
def test_saving_bound(rank: int, expected: float) -> None:
    assert attention_core_saving_bound(64, rank) == pytest.approx(expected)


def _matmul_ratio(length: int, rank: int) -> tuple[float, float]:
    """(scores + output) ratio and total ratio of calibrated low rank vs full."""
    low = lowrank_attention_flops(length, length, 64, rank, "calibrated")
    full = full_attention_flops(length, length, 64)
    core = (low.scores + low.output) / (full.scores + full.output)
    return core, flops_ratio(low, full)


@pytest.mark.parametrize("rank", [16, 32])
def test_calibrated_ratio_approaches_bound(rank: int) -> None:
    target = 1.0 - attention_core_saving_bound(64, rank)
    core, total = _matmul_ratio(8192, rank)
    assert core == pytest.approx(target, rel=1e-12)
    # Softmax, projections and the key rotation keep the total above the bound, but only slightly.
    assert target < total < target + 0.02
    _, total_short = _matmul_ratio(64, rank)
    assert total - target < total_short - target


def test_gram_costs_more_than_full_at_small_n_high_rank() -> None:
    full = full_attention_flops(16, 16, 64, heads=4)
    gram = lowrank_attention_flops(16, 16, 64, 48, "gram", heads=4, kv_heads=2)
    assert gram.total > full.total
    assert flops_ratio(gram, full) > 1.0
    assert gram.scores < full.scores  # the kernel itself is cheaper; the basis is not


def test_flops_ratio_rejects_empty_full() -> None:
    with pytest.raises(ValueError, match="^full "):
        flops_ratio(full_attention_flops(T, N, D), FlopsBreakdown())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"queries": 0}, "queries"),
        ({"keys": 0}, "keys"),
        ({"head_dim": -2}, "head_dim"),
        ({"heads": 0}, "heads"),
    ],
)
def test_full_bad_inputs(kwargs: dict[str, int], name: str) -> None:
    args = {"queries": T, "keys": N, "head_dim": D, "heads": H}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name} "):
        full_attention_flops(**args)


@pytest.mark.parametrize(("d", "r", "name"), [(0, 1, "head_dim"), (8, 0, "rank"), (8, 9, "rank")])
def test_bound_bad_inputs(d: int, r: int, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        attention_core_saving_bound(d, r)


def test_standard_count_bad_inputs() -> None:
    with pytest.raises(ValueError, match="^n "):
        eigh_flops(0)
    with pytest.raises(ValueError, match="^m "):
        svd_flops(0, 3)

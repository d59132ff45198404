"""Tests for executed-FLOPs accounting against hand counts."""

from __future__ import annotations

import pytest

from drrl_env.flops import (
    METHODS,
    FlopsBreakdown,
    attention_core_saving_bound,
    eigh_flops,
    flops_ratio,
    full_attention_flops,
    lowrank_attention_flops,
    svd_flops,
)

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
        subspace=0,
        projections=0,
        scores=2 * (2 * 4 * 6 * 8),
        softmax=2 * (5 * 4 * 6),
        output=2 * (2 * 4 * 6 * 8),
    )
    assert b.total == 768 + 240 + 768


def test_calibrated_hand_count() -> None:
    b = lowrank_attention_flops(T, N, D, R, "calibrated", heads=H, kv_heads=KV)
    assert b == FlopsBreakdown(
        subspace=0,
        projections=2 * (2 * 4 * 8 * 2 + 2 * 6 * 8 * 2),
        scores=2 * (2 * 4 * 6 * 2),
        softmax=2 * (5 * 4 * 6),
        output=2 * (2 * 4 * 6 * 8),
    )


def test_gram_hand_count_all_keys() -> None:
    b = lowrank_attention_flops(T, N, D, R, "gram", heads=H, kv_heads=KV)
    per_query_head = 2 * 4 * 8 * 8 + 8 * 8 + 9 * 8 * 8 * 8
    per_kv_head = 2 * 6 * 8 * 8
    assert b.subspace == 2 * per_query_head + 1 * per_kv_head == 11136
    assert b.projections == 2 * (2 * 4 * 8 * 2 + 2 * 6 * 8 * 2)
    assert b.scores == 2 * (2 * 4 * 6 * 2)
    assert b.softmax == 2 * (5 * 4 * 6)
    assert b.output == 2 * (2 * 4 * 6 * 8)


def test_gram_hand_count_new_keys() -> None:
    b = lowrank_attention_flops(T, N, D, R, "gram", heads=H, kv_heads=KV, new_keys=3)
    assert b.subspace == 2 * (2 * 4 * 8 * 8 + 8 * 8 + 9 * 8 * 8 * 8) + 1 * (2 * 3 * 8 * 8)
    zero = lowrank_attention_flops(T, N, D, R, "gram", heads=H, kv_heads=KV, new_keys=0)
    full_keys = lowrank_attention_flops(T, N, D, R, "gram", heads=H, kv_heads=KV, new_keys=N)
    assert full_keys == lowrank_attention_flops(T, N, D, R, "gram", heads=H, kv_heads=KV)
    assert b.subspace - zero.subspace == 2 * 3 * 8 * 8
    assert b.projections == zero.projections == full_keys.projections


def test_svd_hand_count() -> None:
    b = lowrank_attention_flops(T, N, D, R, "svd", heads=H, kv_heads=KV)
    svd_q = 4 * 8 * 8 * 4 + 8 * 8 * 4 * 4  # 4 x 8 queries: wide, via the transpose
    svd_k = 4 * 8 * 8 * 6 + 8 * 8 * 6 * 6  # 6 x 8 keys: wide as well
    core = 2 * 2 * 8 * 2
    assert b.subspace == 2 * (svd_q + core) + 1 * svd_k == 8064
    assert b.projections == 2 * (2 * 4 * 8 * 2 + 2 * 4 * 2 * 2) + 1 * (2 * 6 * 8 * 2) == 512
    assert b.scores == 2 * (2 * 4 * 6 * 2)
    assert b.softmax == 2 * (5 * 4 * 6)
    assert b.output == 2 * (2 * 4 * 6 * 8)


def test_svd_key_work_scales_with_kv_heads() -> None:
    one = lowrank_attention_flops(T, N, D, R, "svd", heads=H, kv_heads=1)
    two = lowrank_attention_flops(T, N, D, R, "svd", heads=H, kv_heads=2)
    assert two.subspace - one.subspace == svd_flops(N, D)
    assert two.projections - one.projections == 2 * N * D * R


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_falls_back_to_full(method: str) -> None:
    full = full_attention_flops(T, N, D, heads=H)
    assert lowrank_attention_flops(T, N, D, D, method, heads=H, kv_heads=KV) == full


def test_full_method_ignores_rank() -> None:
    assert lowrank_attention_flops(T, N, D, R, "full", heads=H) == full_attention_flops(
        T, N, D, heads=H
    )


def test_breakdown_sum_and_dict() -> None:
    a = full_attention_flops(T, N, D)
    b = lowrank_attention_flops(T, N, D, R, "gram")
    s = a + b
    assert s.total == a.total + b.total
    assert sum([a, b]) == s
    d = s.as_dict()
    assert d["total"] == s.total
    assert set(d) == {"subspace", "projections", "scores", "softmax", "output", "total"}
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
    # Softmax and projections keep the total ratio above the bound, but only slightly.
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
        ({"queries": 2.0}, "queries"),
        ({"queries": True}, "queries"),
        ({"keys": -1}, "keys"),
        ({"head_dim": 0}, "head_dim"),
        ({"rank": 0}, "rank"),
        ({"rank": D + 1}, "rank"),
        ({"method": "qr"}, "method"),
        ({"heads": 0}, "heads"),
        ({"kv_heads": 0}, "kv_heads"),
        ({"kv_heads": 3}, "kv_heads"),
        ({"heads": 3, "kv_heads": 2}, "kv_heads"),
        ({"new_keys": -1}, "new_keys"),
        ({"new_keys": N + 1}, "new_keys"),
    ],
)
def test_lowrank_bad_inputs(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {
        "queries": T,
        "keys": N,
        "head_dim": D,
        "rank": R,
        "method": "gram",
        "heads": H,
        "kv_heads": KV,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name} "):
        lowrank_attention_flops(**args)  # type: ignore[arg-type]


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

"""``topp``: top-p selection under the rank-r estimate, its kernels, kept counts and FLOPs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods import make_method, method_class, method_names
from drrl_env.methods.base import CallShape, Setting, exact_flops, full_attention, kept_keys
from drrl_env.methods.topk import MIN_KEYS
from drrl_env.methods.topp import TopPMethod
from tests.test_methods import HKV, D, H, causal_inputs, random_basis

SCALING = D**-0.5
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 inputs, softmax in float32


def build(seed: int = 0, **options) -> TopPMethod:
    return make_method("topp", D, 1, basis=random_basis(HKV, seed), **options)


def observed(method, query, key) -> dict:
    state = method.new_state(0)
    method.observe(state, query, key)
    return state


def expected_kept(method, query, key, mask, setting: Setting) -> torch.Tensor:
    """(B, H, T, N) keys top-p keeps, computed by hand from the basis, one row at a time."""
    basis = method.basis[0].to(query.dtype).repeat_interleave(H // HKV, 0)  # (H, d, d)
    rank = setting.rank
    rotated_keys = (key @ method.basis[0].to(key.dtype)).repeat_interleave(H // HKV, 1)
    estimate = (query @ basis[..., :rank]) @ rotated_keys[..., :rank].transpose(-1, -2)
    allowed = mask > torch.finfo(mask.dtype).min / 2  # (B, 1, T, N)
    batch, heads, queries, n_keys = estimate.shape
    kept = torch.zeros(batch, heads, queries, n_keys, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(queries):
                keys = allowed[b, 0, i].nonzero()[:, 0]  # the causal keys of query i
                n_i = len(keys)
                weights = F.softmax((estimate[b, h, i, keys] * SCALING).float(), dim=-1)
                ordered = weights.sort(descending=True)
                below = int((ordered.values.cumsum(0) < setting.keep).sum()) + 1
                below = n_i if setting.keep >= 1 else below  # p = 1: every causal key
                k_i = min(n_i, max(min(method.min_keys, n_i), below))
                kept[b, h, i, keys[ordered.indices[:k_i]]] = True
    return kept


def dense_attention_on(kept, query, key, value) -> torch.Tensor:
    """Exact attention of every query on its kept keys only."""
    keys = key.repeat_interleave(H // HKV, 1)
    scores = (query @ keys.transpose(-1, -2) * SCALING).masked_fill(~kept, -math.inf)
    return F.softmax(scores, dim=-1) @ value.repeat_interleave(H // HKV, 1)


# -- the setting ------------------------------------------------------------------------------


def test_topp_is_registered_and_its_cost_depends_on_the_input():
    assert method_names().index("topp") == method_names().index("topk-block") + 1
    cls = method_class("topp")
    assert cls.uses_keep and cls.keep_allows_zero and not cls.static_cost
    assert all(
        method_class(name).static_cost and not method_class(name).keep_allows_zero
        for name in method_names()
        if name != "topp"
    )


def test_check_setting_takes_a_zero_mass_for_topp_only():
    method = build()
    assert method.check_setting(Setting(4, 0)) == Setting(4, 0.0)
    assert not Setting(D, 0.0).is_exact(D) and Setting(D, 1.0).is_exact(D)
    with pytest.raises(ValueError, match=r"keep=1.5 must be a number in \[0, 1\]"):
        method.check_setting(Setting(4, 1.5))
    topk = make_method("topk", D, 1)
    with pytest.raises(ValueError, match=r"keep=0.0 must be a number in \(0, 1\]"):
        topk.check_setting(Setting(4, 0.0))


@pytest.mark.parametrize("name", [n for n in method_names() if n != "full"])  # full: keep unused
def test_a_negative_keep_is_refused_by_every_method(name):
    cls = method_class(name)
    method = make_method(name, D, 1, **({"basis": random_basis(HKV)} if cls.needs_basis else {}))
    with pytest.raises(ValueError, match="keep=-0.1 must be a number in"):
        method.check_setting(Setting(4, -0.1))


# -- kernels -------------------------------------------------------------------------------

SETTINGS = [
    Setting(4, 0.9),
    Setting(4, 0.0),
    Setting(4, 1.0),
    Setting(8, 0.5),
    Setting(D, 0.8),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label())
@pytest.mark.parametrize("chunk", [5, 64])
def test_both_kernels_agree_with_the_reference_and_the_hand_selection(setting, chunk):
    query, key, value, mask = causal_inputs(seed=1, dtype=torch.float32)
    method = build(seed=2, min_keys=3, query_chunk=chunk)
    state = observed(method, query, key)
    reference = method.reference(state, query, key, value, mask, SCALING, setting)
    kept_reference = method.executed_kept(state, CallShape.of(query, key), setting)
    kept = expected_kept(method, query, key, mask, setting)
    assert kept_reference == int(kept.sum())
    torch.testing.assert_close(reference, dense_attention_on(kept, query, key, value), **TOL)
    for path in (method.attend, method.attend_gather):
        output = path(state, query, key, value, mask, SCALING, setting)
        torch.testing.assert_close(output, reference, **TOL)
        assert state["kept"] == kept_reference


def test_a_call_over_a_kv_cache_attends_the_hand_selection():
    query, key, value, mask = causal_inputs(seed=3, queries=24, keys=40, dtype=torch.float32)
    method = build(seed=4, min_keys=4)
    state = method.new_state(0)
    method.observe(state, query[:, :, :8], key[:, :, :24])  # a first segment of 24 keys
    segment = slice(24 - 8, 24)  # the next 8 queries over the 32 cached keys
    query, key, value = query[:, :, segment], key[:, :, :32], value[:, :, :32]
    mask = mask[:, :, segment, :32]  # (1, 1, 8, 32), causal: query i sees 25 + i keys
    method.observe(state, query, key)
    assert state["fresh"] == 8
    for setting in (Setting(4, 0.7), Setting(6, 0.0), Setting(D, 0.95)):
        kept = expected_kept(method, query, key, mask, setting)
        expected = dense_attention_on(kept, query, key, value)
        for path in (method.attend, method.attend_gather, method.reference):
            output = path(state, query, key, value, mask, SCALING, setting)
            torch.testing.assert_close(output, expected, **TOL)
            assert state["kept"] == int(kept.sum())


def test_the_exact_setting_is_exact_attention_and_keeps_every_causal_key():
    inputs = causal_inputs(seed=5, dtype=torch.float32)
    method = build()
    state = observed(method, *inputs[:2])
    exact = full_attention(*inputs, SCALING)
    for path in (method.attend, method.attend_gather, method.reference):
        torch.testing.assert_close(path(state, *inputs, SCALING, Setting(D)), exact, **TOL)
    shape = CallShape.of(inputs[0], inputs[1])
    assert method.executed_kept(state, shape, Setting(D)) == H * sum(range(17, 41))
    # p = 1 below full rank keeps every causal key: exact output, the selection still paid.
    for path in (method.attend, method.attend_gather, method.reference):
        torch.testing.assert_close(path(state, *inputs, SCALING, Setting(4, 1.0)), exact, **TOL)
        assert method.executed_kept(state, shape, Setting(4, 1.0)) == H * sum(range(17, 41))


# -- kept counts -----------------------------------------------------------------------------


def test_mass_counts_by_hand_with_the_floor_the_causal_keys_and_a_rounding_dip():
    from drrl_env.methods.topp import key_positions, mass_counts

    mass = torch.tensor([[[[0.5, 0.7, 0.9, 0.95, 1.0], [0.2, 0.6, 0.6, 0.8999, 0.9]]]])
    dipped = mass.clone()
    dipped[0, 0, 1, 2] = 0.59999  # a float scan's dip below an earlier prefix
    n_i = torch.tensor([[[5, 4]]])
    low = n_i.clamp_max(2)
    for cumulative in (mass, dipped):
        counts = mass_counts(cumulative, [0.0, 0.6, 0.9, 1.0], n_i, low)
        assert counts[0.0].tolist() == [[[2, 2]]]  # the floor: min(n_i, min_keys)
        assert counts[0.6].tolist() == [[[2, 2]]]  # first prefix reaching 0.6: 2 and 2 keys
        assert counts[0.9].tolist() == [[[3, 4]]]  # 0.9 at key 3; at key 5, capped by n_i 4
        assert counts[1.0].tolist() == [[[5, 4]]]  # p = 1: every causal key
    order = torch.tensor([[[[3, 0, 2], [1, 2, 0]]]])  # a partial ordering of 4 keys
    position = key_positions(order, 4)
    assert position.tolist() == [[[[1, 4, 2, 0], [2, 0, 1, 4]]]]  # unlisted keys: 4
    assert (position < torch.tensor([[[2, 3]]])[..., None]).tolist() == [
        [[[True, False, False, True], [True, True, True, False]]]
    ]


@pytest.mark.parametrize("min_keys", [1, 3, 30])
@pytest.mark.parametrize("mass", [0.0, 0.3, 0.9])
def test_kept_counts_are_the_fewest_keys_reaching_the_mass(min_keys, mass):
    query, key, value, mask = causal_inputs(seed=6, dtype=torch.float32)
    method = build(seed=7, min_keys=min_keys, query_chunk=7)
    state = observed(method, query, key)
    causal = torch.as_tensor(CallShape(24, 40, D).causal_keys())  # 17, ..., 40
    rank = 5
    query_proj, key_proj = method.rotated(state, query, rank)
    logits = (query_proj @ key_proj.transpose(-1, -2)) * SCALING  # (1, H, T, N)
    for start, stop, order, counts in method.ranked(state, query, mask, SCALING, rank, [mass]):
        count = counts[mass][0]  # (H, Tc)
        n_i = causal[start:stop]  # (Tc,)
        assert (count <= n_i).all() and (count >= n_i.clamp(max=min_keys)).all()
        for h in range(H):
            for row, i in enumerate(range(start, stop)):
                k_i = int(count[h, row])
                chosen = order[0, h, row, :k_i]
                assert (chosen < n_i[row]).all()  # masked (future) keys are never kept
                weights = F.softmax(logits[0, h, i, : n_i[row]].float(), dim=-1)
                ordered = weights.sort(descending=True).values
                assert torch.equal(weights[chosen].sort(descending=True).values, ordered[:k_i])
                assert ordered[:k_i].sum() >= mass - 1e-6  # the kept keys reach p
                if k_i > min(min_keys, int(n_i[row])):  # and dropping the last one does not
                    assert ordered[: k_i - 1].sum() < mass
    if mass == 0:  # p = 0 keeps the min_keys best keys only: the static count
        kept, totals = method.selected(state, query, mask, SCALING, rank, [0.0])
        assert totals[0.0] == H * int(causal.clamp(max=min_keys).sum()) == kept[0.0].sum()


@pytest.mark.parametrize("mass", [0.5, 0.8, 0.95])
def test_at_full_rank_the_kept_keys_hold_at_least_the_mass_of_exact_attention(mass):
    query, key, value, mask = causal_inputs(seed=8)  # float64
    method = build(seed=9, min_keys=1)
    state = observed(method, query, key)
    kept, _ = method.selected(state, query, mask, SCALING, D, [mass])
    keys = key.repeat_interleave(H // HKV, 1)
    weights = F.softmax(query @ keys.transpose(-1, -2) * SCALING + mask, dim=-1)  # (1,H,T,N)
    held = (weights * kept[mass]).sum(-1)  # (1, H, T)
    assert (held >= mass - 1e-5).all()
    assert not (kept[mass] & (mask < 0)).any()
    assert kept[mass].sum() < (mask == 0).sum() * H  # and some keys are dropped


# -- sweeps and realised costs -------------------------------------------------------------


def test_sweep_outputs_and_costs_equal_each_setting_run_alone():
    query, key, value, mask = causal_inputs(seed=10, dtype=torch.float32)
    method = build(seed=11, min_keys=3)
    settings = [Setting(4, 0.5), Setting(4, 0.9), Setting(4, 0.0), Setting(8, 0.9)]
    settings += [Setting(D, 0.7), Setting(D), Setting(4, 1.0)]
    shape = CallShape.of(query, key)
    state = observed(method, query, key)
    swept = method.sweep_outputs(state, query, key, value, mask, SCALING, settings)
    costs = method.sweep_costs(state, shape, settings)
    for setting, output, (flops, kept) in zip(settings, swept, costs, strict=True):
        alone = method.reference(state, query, key, value, mask, SCALING, setting)
        torch.testing.assert_close(output, alone, **TOL)
        method.attend(state, query, key, value, mask, SCALING, setting)
        assert kept == method.executed_kept(state, shape, setting)
        assert flops == method.executed_flops(state, shape, setting)
        assert flops == method.flops_for_kept(shape, setting, kept)
        assert kept <= method.kept_total(shape, setting)
        assert flops.total <= method.flops(shape, setting).total
    assert costs[5] == (method.flops(shape, Setting(D)), H * sum(range(17, 41)))
    assert costs[2][1] == method.kept_total(shape, Setting(4, 0.0))  # p = 0: static
    with pytest.raises(ValueError, match="other settings"):
        method.sweep_costs(state, shape, settings[:2])
    with pytest.raises(ValueError, match="no attend call"):
        method.executed_kept(method.new_state(0), shape, Setting(4, 0.5))


def test_static_methods_report_their_static_costs():
    query, key, value, mask = causal_inputs(seed=12)
    method = make_method("topk", D, 1, basis=random_basis(HKV), min_keys=5)
    shape, setting = CallShape.of(query, key), Setting(4, 0.25)
    state = observed(method, query, key)
    method.attend(state, query, key, value, mask, SCALING, setting)
    assert method.executed_flops(state, shape, setting) == method.flops(shape, setting)
    assert method.executed_kept(state, shape, setting) == method.kept_total(shape, setting)
    settings = [setting, Setting(D)]
    method.sweep_outputs(state, query, key, value, mask, SCALING, settings)
    assert method.sweep_costs(state, shape, settings) == [
        (method.flops(shape, s), method.kept_total(shape, s)) for s in settings
    ]


@pytest.mark.parametrize("keep_of", ["window", "query"])
def test_topk_kept_total_is_the_sum_of_its_kept_keys(keep_of):
    method = make_method("topk", 8, 1, min_keys=2, keep_of=keep_of)
    shape = CallShape(4, 6, 8, heads=2, kv_heads=1, batch=3)
    kept = kept_keys(shape.causal_keys(), 0.5, 2, 6 if keep_of == "window" else None)
    assert method.kept_total(shape, Setting(2, 0.5)) == 3 * 2 * int(kept.sum())
    assert method.kept_total(shape, Setting(8)) == 3 * 2 * (3 + 4 + 5 + 6)
    assert make_method("gram", 8, 1).kept_total(shape, Setting(2)) == 3 * 2 * 18


def test_topk_block_kept_total_counts_the_causal_keys_of_its_kept_blocks():
    generator = torch.Generator().manual_seed(13)
    query = torch.randn(1, H, 8, D, generator=generator, dtype=torch.float64)
    key = torch.randn(1, HKV, 12, D, generator=generator, dtype=torch.float64)
    method = make_method("topk-block", D, 1, basis=random_basis(HKV, 3), block=2, min_keys=2)
    state = observed(method, query, key)
    setting = Setting(4, 0.5)
    kept, indices = method.select_blocks(state, query, setting)
    dense = method._dense_mask(kept, indices, 8, 12)  # (1, H, 8, 12)
    assert method.kept_total(CallShape.of(query, key), setting) == int(dense.sum())
    assert int(dense.sum()) == H * 4 * (2 * 4 + 3)  # 3 of 6 blocks: 2 whole + the diagonal


# -- FLOPs against hand counts --------------------------------------------------------------

SHAPE = CallShape(queries=4, keys=6, head_dim=8, heads=2, kv_heads=1, new_keys=4)
# Queries see 3, 4, 5, 6 keys (18 per head, 36 over the 2 heads); ceil(log2 6) = 3.
FEATURES = 1 * (2 * 4 * 8 * 8 + 2 * 4 * 8)  # rotate the 4 new keys, their energies: 576


def selection_part(rank: int) -> FlopsBreakdown:
    return FlopsBreakdown(
        features=FEATURES,
        projections=2 * (2 * 4 * 8 * rank),  # rotate the queries: 256 at rank 2
        scores=2 * (2 * 4 * 6 * rank),  # selection scores: 192 at rank 2
        selection=2 * 4 * 6 * (5 + 3 + 1),  # softmax, sort, cumsum of 24 scores: 432
    )


def kept_part(kept: int) -> FlopsBreakdown:
    return FlopsBreakdown(scores=2 * kept * 8, softmax=5 * kept, output=2 * kept * 8)


def test_topp_hand_count():
    method = make_method("topp", 8, 1, min_keys=2)
    # Realised: 20 keys kept over heads and queries.
    realised = FlopsBreakdown(
        features=576, projections=256, scores=192 + 320, selection=432, softmax=100, output=320
    )
    assert realised == selection_part(2) + kept_part(20)
    assert method.flops_for_kept(SHAPE, Setting(2, 0.9), 20) == realised
    # Upper bound: every causal key, 36.
    upper = FlopsBreakdown(
        features=576, projections=256, scores=192 + 576, selection=432, softmax=180, output=576
    )
    assert method.kept_total(SHAPE, Setting(2, 0.9)) == 36
    assert method.flops(SHAPE, Setting(2, 0.9)) == upper == selection_part(2) + kept_part(36)
    # p = 0: min(n_i, 2) = 2 keys per query, 16 over heads and queries: exact and static.
    floor = FlopsBreakdown(
        features=576, projections=256, scores=192 + 256, selection=432, softmax=80, output=256
    )
    assert method.kept_total(SHAPE, Setting(2, 0.0)) == 16
    assert method.flops(SHAPE, Setting(2, 0.0)) == floor
    # Full rank with p < 1 still selects; p = 1 at full rank is exact attention.
    assert method.flops(SHAPE, Setting(8, 0.5)) == selection_part(8) + kept_part(36)
    assert method.flops(SHAPE, Setting(8)) == FlopsBreakdown(features=576) + exact_flops(SHAPE)
    assert method.flops_for_kept(SHAPE, Setting(8), 0) == method.flops(SHAPE, Setting(8))
    # Batches scale every count (the kept total is summed over the batch already).
    batch = CallShape(4, 6, 8, 2, 1, new_keys=4, batch=3)
    assert method.kept_total(batch, Setting(2, 0.9)) == 3 * 36
    assert method.flops_for_kept(batch, Setting(2, 0.9), 60) == realised.scaled(3)


def test_topp_options_are_checked():
    with pytest.raises(ValueError, match="min_keys"):
        build(min_keys=0)
    with pytest.raises(ValueError, match="query_chunk"):
        build(query_chunk=0)
    assert build().min_keys == MIN_KEYS
    assert np.isclose(build().query_chunk, 64)


@pytest.mark.parametrize("mass", [0.0, 0.5, 0.95])
def test_partial_selection_keeps_what_a_full_sort_keeps(mass, monkeypatch):
    """Rows of 600 keys: the partial top-k round (and its fall-back to a full sort) keeps
    exactly the keys a full sort of every row keeps, whether the estimate is peaked (one
    partial round suffices) or flat (some chunks need the full sort); on the peaked rows
    also exactly what the row-by-row hand selection keeps."""
    import drrl_env.methods.topp as topp

    torch.manual_seed(3)
    n_keys, queries = 600, 70  # more keys than FIRST_CANDIDATES, two query chunks
    key = torch.randn(1, HKV, n_keys, D)
    value = torch.randn(1, HKV, n_keys, D)
    mask = torch.zeros(1, 1, queries, n_keys)
    i = torch.arange(queries)[:, None] + (n_keys - queries)
    mask[0, 0][torch.arange(n_keys)[None] > i] = torch.finfo(torch.float32).min
    for scale in (4.0, 0.3):  # peaked, then flat estimated attention
        query = torch.randn(1, H, queries, D) * scale
        method = build(seed=11, min_keys=8)
        state = observed(method, query, key)
        kept, totals = method.selected(state, query, mask, SCALING, 6, [mass])
        with monkeypatch.context() as patch:
            patch.setattr(topp, "FIRST_CANDIDATES", n_keys)  # every chunk sorted whole
            sorted_kept, sorted_totals = (
                method.selected(state, query, mask.clone(), SCALING, 6, [mass])
                if mass > 0
                else (kept, totals)
            )
        assert torch.equal(kept[mass], sorted_kept[mass]) and totals == sorted_totals
        if scale > 1:
            expected = expected_kept(method, query, key, mask, Setting(6, mass))
            assert torch.equal(kept[mass], expected)
        output = method.attend(state, query, key, value, mask, SCALING, Setting(6, mass))
        torch.testing.assert_close(output, dense_attention_on(kept[mass], query, key, value), **TOL)

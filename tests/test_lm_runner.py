"""run_window and LiveWindow: exact perplexity, schedules, closed loop, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drrl_env.lm.attention import attention_modules
from drrl_env.lm.models import load_model
from drrl_env.lm.runner import LiveWindow, WindowResult, run_window

FIELDS = ("ranks", "fidelity", "flops", "flops_full", "spectra", "input_stats")


def window(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n)


def plain_perplexity(lm, tokens) -> float:
    """exp(mean cross-entropy) of one plain forward of the whole window."""
    ids = torch.as_tensor(tokens)[None]
    logits = lm.model(input_ids=ids).logits[0, :-1]
    return math.exp(float(F.cross_entropy(logits, ids[0, 1:])))


def assert_same_result(a: WindowResult, b: WindowResult) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.nll_sum == b.nll_sum
    assert a.n_predicted == b.n_predicted


def assert_detached(lm) -> None:
    """No controller is active here, and the kernel computes plain eager attention again."""
    from drrl_env.lm.controller import ACTIVE

    assert ACTIVE.get() is None
    assert all(len(module._forward_pre_hooks) <= 1 for module in attention_modules(lm.model))


def ramp_table(lm, n_segments: int) -> np.ndarray:
    """A (segments, layers) schedule with a different rank almost everywhere."""
    d = lm.head_dim
    table = np.array(
        [[1 + (7 * s + 3 * layer) % d for layer in range(lm.n_layers)] for s in range(n_segments)]
    )
    table[-1, 0] = d  # full rank somewhere too
    return table


# -- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("segment_length", [1, 7, 16, 48, 100])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_full_rank_perplexity_equals_plain_forward(request, name, segment_length):
    lm = request.getfixturevalue(name.replace("-", "_"))
    tokens = window()
    result = run_window(lm, tokens, segment_length, method="gram")
    assert result.n_predicted == len(tokens) - 1
    assert result.ranks.shape == (math.ceil(48 / segment_length), lm.n_layers)
    assert np.all(result.ranks == lm.head_dim)
    assert np.all(result.fidelity == 1.0)
    # Exact attention executes exactly its own FLOPs plus the observation's eigendecompositions.
    assert result.flops_ratio > 1.0
    assert run_window(lm, tokens, segment_length, method="full").flops_ratio == 1.0
    assert result.perplexity == pytest.approx(plain_perplexity(lm, tokens), rel=1e-4)


@pytest.mark.slow
def test_smollm2_full_rank_perplexity_equals_plain_forward(smollm2):
    tokens = smollm2.tokenizer.encode(
        "Attention is computed segment by segment over the key-value cache. Each segment adds "
        "its keys to the cache, and every query attends to all keys that came before it, so "
        "splitting the window into segments must not change a single predicted probability."
    )[:64]
    assert len(tokens) > 32
    result = run_window(smollm2, tokens, 16, method="full")
    assert result.ranks.shape == (math.ceil(len(tokens) / 16), smollm2.n_layers)
    assert result.perplexity == pytest.approx(plain_perplexity(smollm2, tokens), rel=1e-4)
    assert result.perplexity < 1000  # a trained model, not noise
    assert_detached(smollm2)


def test_low_rank_changes_the_result(tiny_llama):
    tokens = window()
    full = run_window(tiny_llama, tokens, 16, "gram")
    low = run_window(tiny_llama, tokens, 16, "gram", schedule=2)
    assert np.all(low.ranks == 2)
    assert low.mean_fidelity < 1.0
    assert low.perplexity != full.perplexity
    # Short segments: the Gram and its eigh cost more than the scores save.
    assert np.all(low.flops > low.flops_full)


def test_runs_are_deterministic(tiny_llama):
    tokens = window(seed=3)
    for method in ("gram", "svd"):
        first = run_window(tiny_llama, tokens, 12, method, schedule=5, sweep=[2, 9])
        second = run_window(tiny_llama, tokens, 12, method, schedule=5, sweep=[2, 9])
        assert_same_result(first, second)
        np.testing.assert_array_equal(first.sweep_fidelity, second.sweep_fidelity)


# -- schedules -----------------------------------------------------------------------------


def test_schedule_forms_agree(tiny_llama):
    lm, tokens, seg = tiny_llama, window(), 16
    constant = run_window(lm, tokens, seg, "gram", schedule=6)
    as_numpy = run_window(lm, tokens, seg, "gram", schedule=np.int64(6))
    as_table = run_window(lm, tokens, seg, "gram", schedule=np.full((3, lm.n_layers), 6))
    as_lists = run_window(lm, tokens, seg, "gram", schedule=[[6] * lm.n_layers] * 3)
    as_function = run_window(lm, tokens, seg, "gram", schedule=lambda segment, request: 6)
    for other in (as_numpy, as_table, as_lists, as_function):
        assert_same_result(constant, other)
    assert np.all(constant.ranks == 6)


def test_table_and_function_schedules_agree(tiny_llama):
    lm, tokens, seg = tiny_llama, window(), 16
    table = ramp_table(lm, 3)
    seen = []

    def function(segment: int, request) -> int:
        seen.append((segment, request.layer, request.queries, request.keys))
        return int(table[segment, request.layer])

    from_table = run_window(lm, tokens, seg, "gram", schedule=table)
    from_function = run_window(lm, tokens, seg, "gram", schedule=function)
    np.testing.assert_array_equal(from_table.ranks, table)
    assert_same_result(from_table, from_function)
    assert seen == [(s, layer, 16, 16 * (s + 1)) for s in range(3) for layer in range(lm.n_layers)]


# -- LiveWindow ------------------------------------------------------------------------------


def drive(live: LiveWindow, table: np.ndarray) -> WindowResult:
    request = live.start()
    while request is not None:
        record, request_next = live.step(int(table[live.segment, request.layer]))
        assert record.layer == request.layer
        request = request_next
    return live.result


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_live_window_equals_run_window(tiny_llama, method):
    lm, tokens, seg = tiny_llama, window(), 16
    table = ramp_table(lm, 3)
    expected = run_window(lm, tokens, seg, method, schedule=table)
    live = drive(LiveWindow(lm, tokens, seg, method), table)
    assert_same_result(live, expected)
    assert live.perplexity == expected.perplexity
    assert live.flops_ratio == expected.flops_ratio
    assert_detached(lm)


def test_live_window_close_mid_window_leaves_model_usable(tiny_llama):
    lm, tokens, seg = tiny_llama, window(), 16
    live = LiveWindow(lm, tokens, seg, "gram")
    request = live.start()
    for _ in range(lm.n_layers + 1):  # into the second segment
        _, request = live.step(3)
    assert live.segment == 1 and request is not None
    live.close()
    assert_detached(lm)
    with pytest.raises(RuntimeError, match="start"):
        live.step(3)
    ids = torch.as_tensor(tokens)[None]
    eager = load_model("tiny-llama", attn_implementation="eager")
    torch.testing.assert_close(
        lm.model(input_ids=ids).logits, eager.model(input_ids=ids).logits, rtol=0, atol=1e-5
    )
    # The same object, and a new one, run whole windows afterwards.
    table = ramp_table(lm, 3)
    expected = run_window(lm, tokens, seg, "gram", schedule=table)
    assert_same_result(drive(live, table), expected)
    assert_same_result(drive(LiveWindow(lm, tokens, seg, "gram"), table), expected)


def test_live_window_restart_discards_the_running_window(tiny_llama):
    lm, tokens, seg = tiny_llama, window(), 16
    live = LiveWindow(lm, tokens, seg, "gram")
    live.start()
    live.step(2)
    table = np.full((3, lm.n_layers), 5)
    assert_same_result(drive(live, table), run_window(lm, tokens, seg, "gram", schedule=table))


@pytest.mark.parametrize("rank", [0, 65, 2.5])
def test_live_window_bad_rank_keeps_the_window(tiny_llama, rank):
    lm, tokens, seg = tiny_llama, window(), 16
    rank = lm.head_dim + 1 if rank == 65 else rank
    live = LiveWindow(lm, tokens, seg, "gram")
    live.start()
    with pytest.raises(ValueError, match="rank"):
        live.step(rank)
    record, request = live.step(4)  # the pending layer is still waiting
    assert record.layer == 0 and record.rank == 4 and request.layer == 1
    live.close()
    assert_detached(lm)


def test_live_window_step_before_start(tiny_llama):
    with pytest.raises(RuntimeError, match="start"):
        LiveWindow(tiny_llama, window(), 16).step(4)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["zero", "above", 2.5, True])
def test_bad_rank_raises(tiny_llama, rank):
    lm, tokens = tiny_llama, window()
    rank = {"zero": 0, "above": lm.head_dim + 1}.get(rank, rank)
    with pytest.raises(ValueError, match="rank"):
        run_window(lm, tokens, 16, "gram", schedule=rank)
    if rank is not True:  # a table entry that is not a valid rank, e.g. 2.5, is not truncated
        table = np.full((3, lm.n_layers), 4, dtype=np.asarray(rank).dtype)
        table[1, 1] = rank
        with pytest.raises(ValueError, match="rank"):
            run_window(lm, tokens, 16, "gram", schedule=table)
    with pytest.raises(ValueError, match="rank"):
        run_window(lm, tokens, 16, "gram", schedule=lambda segment, request: rank)
    with pytest.raises(ValueError, match="rank"):
        run_window(lm, tokens, 16, "gram", sweep=[rank])
    assert_detached(lm)


def test_unknown_method_lists_methods(tiny_llama):
    with pytest.raises(ValueError, match="not registered; methods: full, gram, svd"):
        run_window(tiny_llama, window(), 16, method="pca")


def test_too_long_for_context(tiny_gpt2):
    assert tiny_gpt2.max_positions == 1024
    run_window(tiny_gpt2, window(1024), 512, "full")  # exactly the context is fine
    with pytest.raises(ValueError, match="context"):
        run_window(tiny_gpt2, window(1025), 512, "full")


@pytest.mark.parametrize("tokens", [[], [5], np.array([[7]])])
def test_fewer_than_two_tokens(tiny_llama, tokens):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        run_window(tiny_llama, tokens, 4)


@pytest.mark.parametrize("shape", ["fewer segments", "fewer layers", "1-D", "3-D", "transposed"])
def test_schedule_of_wrong_shape(tiny_llama, shape):
    segments, layers = 3, tiny_llama.n_layers
    shape = {
        "fewer segments": (segments - 1, layers),
        "fewer layers": (segments, layers - 1),
        "1-D": (segments,),
        "3-D": (segments, layers, 1),
        "transposed": (layers, segments),
    }[shape]
    with pytest.raises(ValueError, match="schedule has shape"):
        run_window(tiny_llama, window(), 16, schedule=np.full(shape, 4))
    with pytest.raises(ValueError, match="schedule has shape"):
        run_window(tiny_llama, window(), 16, schedule=[[4, 4], [4]])


@pytest.mark.parametrize("segment_length", [0, -3, 2.0, True, None])
def test_bad_segment_length(tiny_llama, segment_length):
    with pytest.raises(ValueError, match="segment_length"):
        run_window(tiny_llama, window(), segment_length)


def test_calibrated_needs_a_basis_of_this_model(tiny_llama, tiny_gpt2):
    with pytest.raises(ValueError, match="basis"):
        run_window(tiny_llama, window(), 16, "calibrated", schedule=4)
    gpt2_shape = (tiny_gpt2.n_layers, tiny_gpt2.n_heads, tiny_gpt2.head_dim, tiny_gpt2.head_dim)
    with pytest.raises(ValueError, match="basis"):
        run_window(
            tiny_llama, window(), 16, "calibrated", 4, basis=torch.eye(16).expand(gpt2_shape)
        )
    llama = (tiny_llama.n_layers, tiny_llama.n_kv_heads, tiny_llama.head_dim, tiny_llama.head_dim)
    wrong_heads = (llama[0], llama[1] + 1, *llama[2:])
    with pytest.raises(ValueError, match="basis"):
        run_window(tiny_llama, window(), 16, "calibrated", 4, basis=torch.zeros(wrong_heads))
    assert_detached(tiny_llama)


def test_error_mid_window_detaches(tiny_llama):
    def failing(segment: int, request) -> int:
        if segment == 1:
            raise KeyError("policy failed")
        return 4

    with pytest.raises(KeyError, match="policy failed"):
        run_window(tiny_llama, window(), 16, schedule=failing)
    assert_detached(tiny_llama)

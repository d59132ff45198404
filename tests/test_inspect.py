"""The notebooks' helpers: per-layer views of rollouts (drrl_env.inspect), comparison frames,
ranks per layer, episode traces and the inline Pareto image (agents.notebook_helpers)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import drrl_env
from agents import FullRankPolicy, StaticRankPolicy, UniformRandomPolicy
from agents.notebook_helpers import (
    comparison_frame,
    episode_trace,
    pareto_image,
    ranks_per_layer,
)
from drrl_env.inspect import (
    attention_shape,
    effective_rank,
    env_config,
    layer_energy,
    layer_fidelity,
    layer_spectra,
    rollout_array,
    smallest_rank_reaching,
)
from harness.reporting import summary_table


def test_layer_fidelity_is_the_mean_over_windows_and_segments(env):
    backend = env.unwrapped.backend
    cosine = rollout_array(backend, "cosine")  # (W, S, L, A)
    assert cosine.shape == (2, 4, 4, 8)
    table = layer_fidelity(backend)
    assert table.shape == (4, 8)
    for layer in range(4):
        np.testing.assert_allclose(table[layer], cosine[:, :, layer].reshape(-1, 8).mean(axis=0))
    np.testing.assert_allclose(table[:, -1], 1.0)
    taylor = layer_fidelity(backend, "dnll_taylor")
    np.testing.assert_allclose(taylor[:, -1], 0.0)


def test_layer_energy_and_spectra_are_truncation_order_sums(env):
    backend = env.unwrapped.backend
    spectra = rollout_array(backend, "spectra")  # (W, S, L, d)
    energy = layer_energy(backend)
    ranks = backend.problem.actions.ranks
    expected = np.stack([spectra[..., :r].sum(-1) for r in ranks], axis=-1).mean(axis=(0, 1))
    np.testing.assert_allclose(energy, expected)
    np.testing.assert_allclose(energy[:, -1], 1.0)
    assert np.all(np.diff(energy, axis=1) >= 0)
    mean = layer_spectra(backend)
    assert mean.shape == (4, 64)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)


def test_rollout_array_is_the_backends_rollout_of_every_window(env):
    base = env.unwrapped
    cache = base.backend.cache  # what rollout_array read before the backend offered rollout
    for name in ("cosine", "spectra"):
        shards = np.stack([np.asarray(cache.shard(w)[name]) for w in range(base.n_windows)])
        for source in (base.backend, base):  # a cached backend, or the env itself
            np.testing.assert_array_equal(rollout_array(source, name), shards)
    np.testing.assert_array_equal(layer_fidelity(base), layer_fidelity(base.backend))
    np.testing.assert_array_equal(layer_energy(base), layer_energy(base.backend))


def test_effective_rank_of_flat_and_single_direction_spectra():
    assert effective_rank(np.ones(8)) == pytest.approx(8.0)
    assert effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    batch = effective_rank(np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(batch, [2.0, 4.0])


def test_smallest_rank_reaching():
    table = np.array([[0.5, 0.95, 1.0], [0.99, 1.0, 1.0], [0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(smallest_rank_reaching(table, (8, 16, 64), 0.9), [16, 8, 64])
    with pytest.raises(ValueError, match="columns"):
        smallest_rank_reaching(table, (8, 64), 0.9)


def test_env_config_and_attention_shape_of_the_tiny_id():
    config = env_config("DRRL-Tiny-v0", split="eval")
    assert config.model == "tiny-llama" and config.split == "eval"
    assert config.method == drrl_env.ENV_IDS["DRRL-Tiny-v0"]["method"]
    config, shape = attention_shape("DRRL-Tiny-v0")
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (4, 4, 2, 64)
    with pytest.raises(ValueError, match="unknown id"):
        env_config("DRRL-Nothing-v0")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "inspect-cache")
    return gym.make("DRRL-Tiny-v0", cache_dir=cache, max_windows=2)


def test_comparison_frame_feeds_the_summary_table(env):
    rl = {"random_agent": UniformRandomPolicy(env, seed=0)}
    baselines = {"full_rank": FullRankPolicy(env), "static_8": StaticRankPolicy(env, 8)}
    frame = comparison_frame(env, [0, 1], rl, baselines)
    assert len(frame) == 6
    assert set(frame["kind"]) == {"rl", "baseline"}
    assert set(frame["method"]) == {"calibrated"}
    assert (frame["attention_flops_full"] > 0).all()
    summary = summary_table(frame)
    assert list(summary["policy"]) == ["random_agent", "full_rank", "static_8"]
    with pytest.raises(ValueError, match="at least one"):
        comparison_frame(env, [0], {}, {})


def test_ranks_per_layer(env):
    frame = comparison_frame(env, [0, 1], {}, {"static_8": StaticRankPolicy(env, 8)})
    frame["ranks"] = [json.dumps([[8, 8, 8, 64]] * 4), json.dumps([[8, 16, 8, 64]] * 4)]
    table = ranks_per_layer(frame)
    assert table.shape == (1, 4)
    np.testing.assert_allclose(table.loc["static_8"], [8, 12, 8, 64])
    requested = ranks_per_layer(frame, "requested_ranks")
    np.testing.assert_allclose(requested.loc["static_8"], [8, 8, 8, 8])


def test_episode_trace_records_every_step_and_the_mask(env):
    trace = episode_trace(StaticRankPolicy(env, 8), env, 0)
    assert list(trace["step"]) == list(range(16))
    assert (trace["requested_rank"] == 8).all()
    masked = trace["action_masked"]
    assert (trace.loc[masked, "rank"] > 8).all() and (trace.loc[~masked, "rank"] == 8).all()
    assert all(not mask[0] for mask in trace.loc[masked, "mask"])
    assert all(mask[-1] for mask in trace["mask"])


def test_pareto_image_is_a_png_and_restores_the_backend(env):
    import matplotlib

    frame = comparison_frame(
        env, [0], {}, {"full_rank": FullRankPolicy(env), "static_8": StaticRankPolicy(env, 8)}
    )
    frame["perplexity"] = frame["perplexity_full"] = 10.0  # the cached backend has none
    before = matplotlib.get_backend()
    image = pareto_image(summary_table(frame))
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before

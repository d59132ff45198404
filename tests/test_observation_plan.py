"""The planned observation path (cached backends) equals the reference builder, entry by entry."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 (registers the ids)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("drrl-plan-cache"))


@pytest.mark.parametrize(
    "env_id", ["DRRL-Tiny-v0", "DRRL-Tiny-Budget-v0", "DRRL-Tiny-TopP-Budget-v0"]
)
def test_planned_observations_equal_the_built_ones(cache_root, env_id):
    env = gym.make(env_id, cache_dir=cache_root, max_windows=2).unwrapped
    rng = np.random.default_rng(0)
    for episode in range(4):
        observation, _ = env.reset(options={"window": episode % 2})
        assert env._plan is not None  # the cached backend plans whole episodes
        table = env.backend.table(env.window)
        done = False
        while not done:
            segment, layer = divmod(env.step_index, env.n_layers)
            state = env._state(segment, layer)
            built, perturbations = env.builder.build(
                state, table.spectra[env.step_index], table.input_stats[env.step_index]
            )
            np.testing.assert_array_equal(observation, built)
            np.testing.assert_array_equal(env._perturbations, perturbations)
            observation, _, done, _, _ = env.step(int(rng.integers(env.action_space.n)))


def test_live_backend_builds_each_observation(cache_root):
    env = gym.make("DRRL-Tiny-Live-v0", cache_dir=cache_root, max_windows=1).unwrapped
    env.reset(options={"window": 0})
    assert env._plan is None

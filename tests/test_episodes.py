"""The one episode loop (drrl_env.episodes.play_episode) on the tiny cached env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import drrl_env
from drrl_env.episodes import play_episode
from drrl_env.replay import replay


@pytest.fixture(scope="module")
def env(cache_root):
    env = gym.make("DRRL-Tiny-TopK-v0", max_windows=2, cache_dir=cache_root)
    yield env
    env.close()


def _by_hand(env, window: int, actions: np.ndarray) -> tuple[list[float], dict]:
    env.reset(options={"window": window})
    rewards, info = [], {}
    for action in actions.reshape(-1):
        _, reward, _, _, info = env.step(int(action))
        rewards.append(reward)
    return rewards, info["episode_summary"]


def test_a_table_plays_as_given_and_equals_stepping_by_hand(env) -> None:
    base = env.unwrapped
    rng = np.random.default_rng(0)
    actions = rng.integers(len(base.actions), size=(base.n_segments, base.n_layers))
    trace = play_episode(env, actions, 1)
    rewards, summary = _by_hand(env, 1, actions)
    np.testing.assert_array_equal(trace.rewards, rewards)
    np.testing.assert_array_equal(trace.requested, actions.reshape(-1))
    assert trace.window == 1 and trace.summary == summary and trace.steps is None
    np.testing.assert_array_equal(trace.actions, summary["actions"])
    replayed = replay(base, 1, actions)
    np.testing.assert_array_equal(replayed.rewards, trace.rewards)


def test_a_chooser_sees_each_observation_and_steps_are_recorded(env) -> None:
    base = env.unwrapped
    seen = []

    def choose(observation, env_):
        seen.append(observation.copy())
        return len(base.actions) - 1

    trace = play_episode(env, choose, 0, record_steps=True)
    steps = base.n_segments * base.n_layers
    assert len(seen) == steps == len(trace.steps) == len(trace.rewards)
    assert all(observation.shape == env.observation_space.shape for observation in seen)
    for index, step in enumerate(trace.steps):
        assert step["mask"].dtype == bool and step["mask"].shape == (len(base.actions),)
        assert "episode_summary" not in step
        assert (step["segment"], step["layer"]) == divmod(index, base.n_layers)
    assert (trace.requested == len(base.actions) - 1).all()


def test_bad_tables_and_cut_episodes_are_refused(env) -> None:
    base = env.unwrapped
    with pytest.raises(ValueError, match=r"expected \(segments, layers\)"):
        play_episode(env, np.zeros((1, 2), dtype=int), 0)
    with pytest.raises(ValueError, match="must be integers"):
        play_episode(env, np.full((base.n_segments, base.n_layers), 0.5), 0)
    with pytest.raises(ValueError, match="must be integers"):
        play_episode(env, np.full((base.n_segments, base.n_layers), len(base.actions)), 0)
    cut = gym.wrappers.TimeLimit(base, max_episode_steps=3)
    with pytest.raises(RuntimeError, match="cut before its last step"):
        play_episode(cut, lambda observation, env_: 0, 0)
    assert "DRRL-Tiny-TopK-v0" in drrl_env.ENV_IDS

"""Vectorized dynamic-rank environments: Gymnasium's async vector env and SB3's SubprocVecEnv.

The tiny cache is built once in this process (``tiny_cache``), so the worker processes only
read it. Each vectorized env must give, env by env, the observations and rewards of a single
env reset with the same seed and stepped with the same actions.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AsyncVectorEnv
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import drrl_env  # noqa: F401 (registers the ids)

ENV_ID = "DRRL-Tiny-v0"
N_ENVS = 2
N_STEPS = 5
SEED = 3


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> str:
    """A cache folder holding the tiny env's rollouts, built here before any worker starts."""
    cache = str(tmp_path_factory.mktemp("vector-cache"))
    gym.make(ENV_ID, cache_dir=cache, max_windows=2).close()
    return cache


def single_env_trajectories(
    cache: str, actions: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per env index ``i``: observations and rewards of one env reset with ``SEED + i``."""
    observations, rewards = [], []
    for index in range(N_ENVS):
        env = gym.make(ENV_ID, cache_dir=cache, max_windows=2)
        observation, _ = env.reset(seed=SEED + index)
        seen, got = [observation], []
        for action in actions[:, index]:
            observation, reward, *_ = env.step(int(action))
            seen.append(observation)
            got.append(reward)
        observations.append(np.stack(seen))
        rewards.append(np.array(got))
        env.close()
    return observations, rewards


def step_actions(n_actions: int) -> np.ndarray:
    """A fixed action sequence (steps, envs), different per env."""
    return np.random.default_rng(0).integers(n_actions, size=(N_STEPS, N_ENVS))


def run_vector_env(vector, actions: np.ndarray, reset) -> tuple[np.ndarray, np.ndarray]:
    """Observations (envs, steps + 1, ...) and rewards (envs, steps) of ``actions``."""
    seen, got = [reset()], []
    for action in actions:
        observation, reward, *flags = vector.step(action)
        assert not np.any(flags[0]), "no episode may end within the few steps"
        seen.append(observation)
        got.append(reward)
    return np.stack(seen, axis=1), np.stack(got, axis=1)


def assert_matches_single_envs(cache: str, actions, observations, rewards) -> None:
    expected_obs, expected_rewards = single_env_trajectories(cache, actions)
    for index in range(N_ENVS):
        np.testing.assert_array_equal(observations[index], expected_obs[index])
        # SB3 keeps rewards as float32
        np.testing.assert_allclose(rewards[index], expected_rewards[index], rtol=1e-6)


@pytest.mark.parametrize("context", [None, "forkserver", "spawn"])
def test_gymnasium_async_vector_env_matches_single_envs(tiny_cache, context):
    vector = gym.make_vec(
        ENV_ID,
        num_envs=N_ENVS,
        vectorization_mode="async",
        vector_kwargs={"context": context},
        cache_dir=tiny_cache,
        max_windows=2,
    )
    try:
        assert isinstance(vector, AsyncVectorEnv)
        actions = step_actions(int(vector.single_action_space.n))
        observations, rewards = run_vector_env(vector, actions, lambda: vector.reset(seed=SEED)[0])
        masks = vector.call("action_masks")
    finally:
        vector.close()
    assert_matches_single_envs(tiny_cache, actions, observations, rewards)
    assert len(masks) == N_ENVS and all(mask.dtype == bool and mask[-1] for mask in masks)


@pytest.mark.parametrize(
    ("env_id", "vec_env_cls", "start_method"),
    [
        (f"drrl_env:{ENV_ID}", SubprocVecEnv, None),
        (ENV_ID, SubprocVecEnv, "fork"),
        (ENV_ID, DummyVecEnv, None),
        (ENV_ID, SubprocVecEnv, None),  # the default forkserver: drrl_env is preloaded there
    ],
)
def test_sb3_make_vec_env_matches_single_envs(tiny_cache, env_id, vec_env_cls, start_method):
    vector = make_vec_env(
        env_id,
        n_envs=N_ENVS,
        seed=SEED,
        vec_env_cls=vec_env_cls,
        vec_env_kwargs={"start_method": start_method} if vec_env_cls is SubprocVecEnv else None,
        env_kwargs={"cache_dir": tiny_cache, "max_windows": 2},
    )
    try:
        actions = step_actions(int(vector.action_space.n))
        observations, rewards = run_vector_env(vector, actions, vector.reset)
        assert is_masking_supported(vector)
        masks = get_action_masks(vector)
    finally:
        vector.close()
    assert_matches_single_envs(tiny_cache, actions, observations, rewards)
    assert masks.shape == (N_ENVS, vector.action_space.n) and masks[:, -1].all()

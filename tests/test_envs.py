"""The Gymnasium environment on the tiny model: API, checkers, determinism, backends, masks."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import drrl_env
from drrl_env.envs.backends import CachedRollouts
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.replay import ReplayMismatch, live_env, replay, validate

TINY = drrl_env.ENV_IDS["DRRL-Tiny-v0"][0]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("drrl-cache"))


@pytest.fixture(scope="module")
def tiny_env(cache_root):
    return gym.make("DRRL-Tiny-v0", cache_dir=cache_root)


@pytest.fixture(scope="module")
def tiny_live(cache_root):
    return DynamicRankEnv(**TINY, backend="live", cache_dir=cache_root)


def rollout(env, actions, window=0):
    observation, _ = env.reset(options={"window": window})
    trace = [observation]
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        trace.append((observation, reward, terminated, truncated, info))
    return trace


def test_import_registers_ids_without_torch():
    code = (
        "import sys, drrl_env, gymnasium as gym; gym.spec('DRRL-Wikitext-v0'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_spaces_and_episode_length(tiny_env):
    env = tiny_env.unwrapped
    assert env.ranks == (8, 16, 24, 32, 40, 48, 56, 64)
    assert env.action_space == gym.spaces.Discrete(8)
    assert env.observation_space.shape == (env.layout.size,) == (27,)
    assert env.observation_space.dtype == np.float32
    trace = rollout(tiny_env, [7] * 16)
    assert [step[2] for step in trace[1:]] == [False] * 15 + [True]
    summary = trace[-1][4]["episode_summary"]
    assert summary["flops_reduction"] == pytest.approx(0.0)
    assert summary["mean_fidelity"] == pytest.approx(1.0)
    assert np.array(summary["ranks"]).shape == (4, 4)


def test_both_env_checkers_pass(tiny_env):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    gym_check_env(tiny_env.unwrapped)
    sb3_check_env(tiny_env.unwrapped)


def test_observations_stay_in_bounds(tiny_env):
    rng = np.random.default_rng(0)
    for window in range(3):
        for step in rollout(tiny_env, rng.integers(0, 8, size=16), window)[1:]:
            assert tiny_env.observation_space.contains(step[0])


def test_determinism_same_seed_same_actions(cache_root):
    first, second = (gym.make("DRRL-Tiny-v0", cache_dir=cache_root) for _ in range(2))
    actions = np.random.default_rng(1).integers(0, 8, size=16)
    for env in (first, second):
        env.reset(seed=123)
    traces = []
    for env in (first, second):
        obs, info = env.reset(seed=7)
        trace = [(obs, info)]
        for action in actions:
            trace.append(env.step(action))
        traces.append(trace)
    for a, b in zip(*traces, strict=True):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y


def test_reward_is_the_documented_formula(tiny_env):
    env = tiny_env.unwrapped
    for _, reward, _, _, info in rollout(tiny_env, [0, 3, 5, 7] * 4)[1:]:
        expected = (
            env.config.alpha * info["fidelity"]
            - env.config.beta * info["flops_ratio"]
            - env.config.gamma * info["perturbation"]
        )
        assert reward == pytest.approx(expected, abs=1e-12)
        assert info["flops_ratio"] == pytest.approx(info["flops"] / info["flops_full"])


def test_cached_and_live_agree_on_first_layer_of_first_segment(tiny_env, tiny_live):
    for action in (0, 2, 7):
        cached = rollout(tiny_env, [action], window=3)
        live = rollout(tiny_live, [action], window=3)
        np.testing.assert_array_equal(cached[0], live[0])
        for key in ("fidelity", "flops", "flops_full", "perturbation", "reward", "rank"):
            assert cached[1][4][key] == live[1][4][key], key


def test_live_episode_reports_perplexity_and_compounds_errors(tiny_live):
    from drrl_env.lm.runner import run_window

    env = tiny_live
    trace = rollout(env, [0] * 16, window=1)
    summary = trace[-1][4]["episode_summary"]
    result = run_window(
        env.backend.lm,
        env.backend.tokens[1],
        128,
        "calibrated",
        schedule=np.array(summary["ranks"]),
        basis=env.backend._basis,
    )
    assert summary["perplexity"] == pytest.approx(result.perplexity, rel=1e-12)
    full = run_window(
        env.backend.lm,
        env.backend.tokens[1],
        128,
        "calibrated",
        schedule=None,
        basis=env.backend._basis,
    )
    assert summary["perplexity_full"] == pytest.approx(full.perplexity, rel=1e-12)


def test_masks_guardrail(tiny_env):
    env = tiny_env.unwrapped
    env.reset(options={"window": 0})
    saw_masked = False
    for _ in range(16):
        mask = env.action_masks()
        assert mask.dtype == bool and mask.shape == (8,) and mask[-1]
        perturbations = env._perturbations
        np.testing.assert_array_equal(mask[:-1], perturbations[:-1] <= env.config.max_perturbation)
        blocked = np.flatnonzero(~mask)
        action = int(blocked[0]) if blocked.size else 0
        _, _, terminated, _, info = env.step(action)
        if blocked.size:
            saw_masked = True
            assert info["action_masked"] and info["requested_rank"] == env.ranks[action]
            assert info["rank"] > info["requested_rank"]
        if terminated:
            break
    assert saw_masked, "the tiny env should exercise the guardrail from full rank"


def test_greedy_policy_is_neither_full_rank_nor_static(tiny_env):
    env = tiny_env.unwrapped
    chosen, greedy_return = [], 0.0
    env.reset(options={"window": 0})
    for _ in range(16):
        rewards = env.candidate_rewards()
        allowed = np.flatnonzero(env.action_masks())
        action = int(allowed[np.argmax(rewards[allowed])])
        _, reward, _, _, info = env.step(action)
        assert reward == pytest.approx(rewards[action])
        chosen.append(info["rank"])
        greedy_return += reward
    assert len(set(chosen)) > 1 and set(chosen) != {64}
    full_return = sum(step[1] for step in rollout(tiny_env, [7] * 16)[1:])
    assert greedy_return > full_return


def test_replay_reproduces_rewards_and_perplexity(tiny_live):
    trace = rollout(tiny_live, [7, 4, 2, 0] * 4, window=2)
    schedule = np.array(trace[-1][4]["episode_summary"]["ranks"])
    assert len(set(schedule.flatten())) > 1
    first = replay(tiny_live, 2, schedule)
    assert first.rewards.tolist() == [step[1] for step in trace[1:]]
    again = validate(tiny_live, 2, schedule, rewards=first.rewards, perplexity=first.perplexity)
    np.testing.assert_array_equal(again.rewards, first.rewards)
    with pytest.raises(ReplayMismatch, match="perplexity"):
        validate(tiny_live, 2, schedule, perplexity=first.perplexity * 1.01)
    with pytest.raises(ReplayMismatch, match="reward"):
        validate(tiny_live, 2, schedule, rewards=first.rewards + 0.01)
    with pytest.raises(ValueError, match="shape"):
        replay(tiny_live, 2, schedule[:2])
    with pytest.raises(ValueError, match="grid"):
        replay(tiny_live, 2, np.full((4, 4), 7))
    assert live_env(EnvConfig(**TINY, cache_dir=None)).config.backend == "live"


# -- bad input ---------------------------------------------------------------------------


def test_step_before_reset_and_after_end(cache_root):
    env = DynamicRankEnv(**TINY, cache_dir=cache_root)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    with pytest.raises(RuntimeError, match="before reset"):
        env.action_masks()
    rollout(env, [7] * 16)
    with pytest.raises(RuntimeError, match="ended"):
        env.step(0)


@pytest.mark.parametrize("action", [-1, 8, 2.5, "3"])
def test_action_outside_space(tiny_env, action):
    tiny_env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        tiny_env.unwrapped.step(action)


def test_window_option_out_of_range(tiny_env):
    with pytest.raises(ValueError, match="window"):
        tiny_env.reset(options={"window": 10_000})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ranks": (16, 8, 64)}, "increasing"),
        ({"ranks": (0, 64)}, "increasing"),
        ({"seq_len": 500}, "multiple"),
        ({"split": "test"}, "split"),
        ({"backend": "remote"}, "backend"),
        ({"method": "qr"}, "method"),
        ({"beta": -1.0}, "beta"),
        ({"max_perturbation": 2.0}, "max_perturbation"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**{**TINY, **kwargs})


def test_ranks_beyond_head_dim(cache_root):
    with pytest.raises(ValueError, match="ranks"):
        DynamicRankEnv(**{**TINY, "ranks": (8, 80)}, cache_dir=cache_root)


def test_too_short_corpus(tmp_path, cache_root):
    short = tmp_path / "wiki.test.raw"
    short.write_text(" = A = \n Short text . \n = B = \n Also short . \n")
    with pytest.raises(ValueError, match="seq_len"):
        DynamicRankEnv(**TINY, data_path=str(short), cache_dir=str(tmp_path / "c"))


def test_corrupt_or_stale_cache_is_rebuilt(tmp_path):
    config = EnvConfig(**{**TINY, "max_windows": 2}, cache_dir=str(tmp_path))
    reference = DynamicRankEnv(config)
    path = CachedRollouts.path(config)
    path.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = DynamicRankEnv(config)
    np.testing.assert_array_equal(
        rebuilt.backend.rollouts.fidelity, reference.backend.rollouts.fidelity
    )
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["key"] = np.array('{"other": 1}')
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="another configuration"):
        DynamicRankEnv(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicRankEnv(config)  # now valid: loads silently


@pytest.mark.slow
def test_smollm2_env_passes_checkers(tmp_path):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("DRRL-Wikitext-v0", max_windows=1, cache_dir=str(tmp_path)).unwrapped
    gym_check_env(env)
    sb3_check_env(env)
    assert env.n_layers == 30 and env.ranks[-1] == 64


def test_cache_of_more_windows_serves_fewer(tmp_path):
    three = DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 3}, cache_dir=str(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two = DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 2}, cache_dir=str(tmp_path)))
    assert two.backend.n_windows == 2
    np.testing.assert_array_equal(
        two.backend.rollouts.fidelity, three.backend.rollouts.fidelity[:2]
    )
    with pytest.warns(UserWarning, match="holds 3 windows"):
        four = DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 4}, cache_dir=str(tmp_path)))
    assert four.backend.n_windows == 4

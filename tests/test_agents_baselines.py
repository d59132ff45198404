"""Baselines: the documented rules, SB3's predict interface, masks and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from agents import (
    EnergyThresholdPolicy,
    FullRankPolicy,
    GreedyOraclePolicy,
    StaticRankPolicy,
    UniformRandomPolicy,
    energy_threshold_action,
    make_baseline,
    standard_baselines,
)

# energy of each block of 8 spectrum dims: halves, the last block takes the remainder
BLOCKS = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.0078125])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache_root = str(tmp_path_factory.getbasetemp() / "agents-cache")
    return gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2)


def hand_built_observation(env) -> np.ndarray:
    """An observation whose energies come from a hand-built 64-dim spectrum."""
    spectrum = np.repeat(BLOCKS / 8, 8)
    cumulative = np.concatenate([[0.0], np.cumsum(spectrum)])
    observation = np.zeros(env.observation_space.shape, np.float32)
    observation[env.unwrapped.layout.slices["energy"]] = cumulative[list(env.unwrapped.ranks)]
    return observation


@pytest.mark.parametrize(
    ("tau", "rank"),
    [(0.5, 8), (0.6, 16), (0.75, 16), (0.9, 32), (0.96, 40), (0.97, 48), (0.99, 56), (1.0, 64)],
)
def test_energy_threshold_picks_the_smallest_rank_retaining_tau(env, tau, rank):
    # retained energy at ranks 8, 16, ..., 64: 0.5, 0.75, 0.875, 0.9375, 0.96875, ...
    action, state = EnergyThresholdPolicy(env, tau).predict(hand_built_observation(env))
    assert env.unwrapped.ranks[int(action)] == rank and state is None
    assert action.shape == () and action.dtype == np.int64


def test_energy_threshold_respects_masks(env):
    policy = EnergyThresholdPolicy(env, 0.5)
    mask = np.array([False, False, True, True, True, True, True, True])
    action, _ = policy.predict(hand_built_observation(env), action_masks=mask)
    assert int(action) == 2
    assert energy_threshold_action(np.array([0.1, 0.2, 0.3]), 0.95) == 2


def test_energy_threshold_reads_the_env_spectrum(env):
    base = env.unwrapped
    policy = EnergyThresholdPolicy(env, 0.9)
    observation, _ = env.reset(options={"window": 1})
    chosen = []
    for _ in range(16):
        cumulative = np.concatenate([[0.0], np.cumsum(base.backend.view().spectrum)])
        energies = np.clip(cumulative[list(base.ranks)], 0, 1).astype(np.float32)
        expected = int(np.flatnonzero(energies >= 0.9)[0])
        action, _ = policy.predict(observation)
        assert int(action) == expected
        observation, _, terminated, _, info = env.step(int(action))
        chosen.append(info["requested_rank"])
    assert terminated and len(set(chosen)) > 1


def test_static_and_full_rank_on_single_and_batched_observations(env):
    observation, _ = env.reset(options={"window": 0})
    batch = np.stack([observation] * 3)
    assert int(StaticRankPolicy(env, 24).predict(observation)[0]) == 2
    np.testing.assert_array_equal(FullRankPolicy(env).predict(batch)[0], [7, 7, 7])
    masks = np.ones((3, 8), bool)
    masks[1, :4] = False
    np.testing.assert_array_equal(
        StaticRankPolicy(env, 8).predict(batch, action_masks=masks)[0], [0, 4, 0]
    )


def test_uniform_random_is_seeded_and_never_masked(env):
    observation, _ = env.reset(options={"window": 0})
    batch = np.stack([observation] * 200)
    first = UniformRandomPolicy(env, seed=3).predict(batch)[0]
    np.testing.assert_array_equal(first, UniformRandomPolicy(env, seed=3).predict(batch)[0])
    assert set(first.tolist()) == set(range(8))
    mask = np.array([False, True, False, True, False, False, False, True])
    masked = UniformRandomPolicy(env, seed=3).predict(batch, action_masks=np.tile(mask, (200, 1)))
    assert set(masked[0].tolist()) == {1, 3, 7}


def test_greedy_oracle_takes_the_best_immediate_reward(env):
    oracle = GreedyOraclePolicy(env)
    observation, _ = env.reset(options={"window": 0})
    greedy_return = 0.0
    for _ in range(16):
        rewards = env.unwrapped.candidate_rewards()
        action, _ = oracle.predict(observation)
        assert rewards[int(action)] == rewards.max()
        assert env.unwrapped.action_masks()[int(action)]
        observation, reward, *_ = env.step(int(action))
        assert reward == pytest.approx(rewards.max())
        greedy_return += reward
    full_return = 0.0
    env.reset(options={"window": 0})
    for _ in range(16):
        full_return += env.step(7)[1]
    assert greedy_return > full_return


def test_standard_baselines_cover_every_rank(env):
    policies = standard_baselines(env)
    assert list(policies)[:8] == [
        "full_rank",
        *(f"static_{rank}" for rank in env.unwrapped.ranks[:-1]),
    ]
    assert {"uniform_random", "energy_threshold_0.9", "greedy_oracle"} <= set(policies)
    assert make_baseline("static_rank", env, rank=16).name == "static_16"


# -- bad input ---------------------------------------------------------------------------


def test_bad_baseline_input(env, tmp_path_factory):
    with pytest.raises(ValueError, match="rank=20 is not in the env's grid"):
        StaticRankPolicy(env, 20)
    with pytest.raises(ValueError, match="tau"):
        EnergyThresholdPolicy(env, 0.0)
    with pytest.raises(ValueError, match="unknown baseline.*full_rank, static_rank"):
        make_baseline("adaptive", env)
    with pytest.raises(ValueError, match="observation size 35"):
        FullRankPolicy(env).predict(np.zeros(19, np.float32))
    with pytest.raises(ValueError, match="action_masks"):
        FullRankPolicy(env).predict(np.zeros(35, np.float32), action_masks=np.ones(3, bool))
    with pytest.raises(ValueError, match="dynamic-rank env"):
        FullRankPolicy(gym.make("CartPole-v1"))
    env.reset(options={"window": 0})
    with pytest.raises(ValueError, match="one observation at a time"):
        GreedyOraclePolicy(env).predict(np.zeros((2, 35), np.float32))


# -- the registry ------------------------------------------------------------------------


def test_a_toy_baseline_is_one_builder_plus_one_registration(env, monkeypatch):
    from agents import baseline_registry
    from agents.compare import Args, baseline_policy
    from agents.evaluation import evaluate_policy_on_windows

    monkeypatch.setattr(baseline_registry, "BASELINES", dict(baseline_registry.BASELINES))

    class EveryOther(StaticRankPolicy):
        """Alternates the two lowest ranks: a policy no other baseline plays."""

        def __init__(self, env, phase=0):
            super().__init__(env, env.unwrapped.ranks[0])
            self.phase = phase

        def choose(self, observation):
            return (self.phase + env.unwrapped.step_index) % 2

    baseline_registry.register_baseline(
        "every_other",
        lambda context, phase=0: EveryOther(context.env, phase),
        label=lambda phase=0: f"every_other_{phase}",
    )
    ref = baseline_registry.Baseline.of("every_other", phase=1)
    assert ref.label == "every_other_1"
    policy = baseline_policy(ref, env, Args(), "calibrated", [0, 1])
    frame = evaluate_policy_on_windows(policy, env, [0, 1], name=ref.label)
    actions = np.asarray(frame["requested_actions"].map(eval).tolist()).reshape(2, -1)
    np.testing.assert_array_equal(actions, np.tile([1, 0], (2, actions.shape[1] // 2)))
    assert set(frame["policy"]) == {"every_other_1"}
    with pytest.raises(ValueError, match="already registered"):
        baseline_registry.register_baseline("every_other", lambda context: None)
    with pytest.raises(ValueError, match="must be an identifier"):
        baseline_registry.register_baseline("every other", lambda context: None)


def test_registry_labels_and_refusals(env, tmp_path_factory):
    from agents.baseline_registry import Baseline, BaselineContext

    assert Baseline.of("static_rank", rank=16).label == "static_16"
    assert Baseline.of("energy_threshold", tau=0.95).label == "energy_0.95"
    assert Baseline.of("full_rank").label == "full_rank"
    with pytest.raises(ValueError, match="unknown baseline 'static_16'; registered: full_rank"):
        Baseline.of("static_16")  # labels are not parsed back
    with pytest.raises(ValueError, match="needs a budgeted env"):
        Baseline.of("static_allocation").build(BaselineContext(env))
    cache_root = str(tmp_path_factory.getbasetemp() / "agents-cache")
    budget = gym.make("DRRL-Tiny-Budget-v0", cache_dir=cache_root, max_windows=2)
    with pytest.raises(ValueError, match="fitted on cached train windows: pass train="):
        Baseline.of("static_allocation").build(BaselineContext(budget))
    policy = make_baseline("static_allocation", budget, train=budget)
    assert policy.name == "static_allocation" and policy.allocation.shape == (4,)

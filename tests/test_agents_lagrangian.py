"""Lagrangian PPO on a soft budget: the penalty, the dual step, save/load, refusals (tiny model)."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv

import drrl_env  # noqa: F401 (registers the ids)
from agents import load_agent, make_agent, save_agent
from agents.hyperparams import BUDGET_DISCOUNT, LagrangianPPOParams
from agents.lagrangian import TRAIN_ON_SOFT_BUDGET, LagrangianPenalty, LagrangianPPO

ENV_ID = "DRRL-Tiny-TopP-Budget-v0"
STEPS = 16  # 4 segments x 4 layers
SHORT = {"n_steps": 4 * STEPS, "batch_size": 32, "n_epochs": 1}  # a rollout: 4 episodes
LOW_BUDGET = 0.4  # above the tiny topp floor (0.37), far below exact attention (1.0)
DUAL_RATE = 0.5


def soft_env(cache_root: str, **kwargs) -> gym.Env:
    return gym.make(ENV_ID, cache_dir=cache_root, max_windows=1, enforce_budget=False, **kwargs)


class EpisodeCosts(BaseCallback):
    """``episode_summary["flops_ratio"]`` of every episode that ends, one list per rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts: list[list[float]] = []

    def _on_rollout_start(self) -> None:
        self.rollouts.append([])

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
            if done:
                self.rollouts[-1].append(info["episode_summary"]["flops_ratio"])
        return True


class Capture(KVWriter):
    """Keeps every row the SB3 logger dumps."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def write(self, key_values, key_excluded, step=0) -> None:
        self.rows.append(dict(key_values))

    def close(self) -> None:
        pass


def observations(env: gym.Env, episodes: int = 2, seed: int = 0) -> np.ndarray:
    """Observations of random-action episodes."""
    rng = np.random.default_rng(seed)
    seen = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            seen.append(observation)
            action = int(rng.integers(env.action_space.n))
            observation, _, done, _, _ = env.step(action)
    return np.stack(seen)


@pytest.fixture(scope="module")
def low_budget(cache_root):
    return soft_env(cache_root, budget=LOW_BUDGET)


@pytest.fixture(scope="module")
def trained(low_budget):
    """One rollout on the low budget from ``lam = 0``, its episodes' costs and its log rows."""
    model = make_agent(
        "lagrangian_ppo", low_budget, seed=0, lambda_learning_rate=DUAL_RATE, **SHORT
    )
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    costs = EpisodeCosts()
    model.learn(SHORT["n_steps"], callback=costs)
    return model, costs, capture


def test_penalty_subtracts_the_price_of_each_steps_flops(cache_root):
    price = [0.7]
    penalised_env = LagrangianPenalty(DummyVecEnv([lambda: soft_env(cache_root)]), lambda: price[0])
    by_hand = soft_env(cache_root)
    full = by_hand.unwrapped.episode_full_flops
    penalised_env.seed(3)
    penalised_env.reset()
    by_hand.reset(seed=3)
    assert penalised_env.env_method("action_masks")[0].all()  # soft: the wall masks nothing
    rng = np.random.default_rng(0)
    summaries, running = [], 0.0
    for step in range(2 * STEPS):
        if step == STEPS // 2:
            price[0] = 2.5  # the price is read at every step
        action = int(rng.integers(by_hand.action_space.n))
        _, reward, terminated, _, info = by_hand.step(action)
        _, penalised, dones, infos = penalised_env.step(np.array([action]))
        cost = info["flops"] / full
        assert cost > 0
        assert infos[0]["flops"] == info["flops"]
        assert infos[0]["cost"] == cost
        assert infos[0]["unpenalised_reward"] == float(np.float32(reward))  # DummyVecEnv's dtype
        assert penalised[0] == pytest.approx(
            infos[0]["unpenalised_reward"] - price[0] * cost, rel=0, abs=1e-12
        )
        assert dones[0] == terminated
        running += cost
        if terminated:
            summaries.append(info["episode_summary"]["flops_ratio"])
            assert running == pytest.approx(summaries[-1], rel=1e-12)  # the budget's unit
            running = 0.0
            by_hand.reset()
    assert len(summaries) == 2
    assert penalised_env.pop_finished_costs() == pytest.approx(summaries, rel=1e-12)
    assert penalised_env.pop_finished_costs() == []


def test_overspending_raises_the_multiplier_by_one_dual_step(trained):
    model, costs, capture = trained
    (episodes,) = costs.rollouts
    assert len(episodes) == SHORT["n_steps"] // STEPS
    mean_cost = float(np.mean(episodes))
    assert mean_cost > LOW_BUDGET + 0.1  # the untrained policy overspends
    expected = DUAL_RATE * (mean_cost - LOW_BUDGET)  # from lam = 0
    assert model.lagrange_multiplier == pytest.approx(expected, rel=1e-9)
    (row,) = [row for row in capture.rows if "lagrangian/lambda" in row]
    assert row["lagrangian/lambda"] == pytest.approx(expected, rel=1e-9)
    assert row["lagrangian/episode_cost"] == pytest.approx(mean_cost, rel=1e-9)
    assert row["lagrangian/constraint_violation"] == pytest.approx(mean_cost - LOW_BUDGET, rel=1e-9)


def test_a_budget_that_does_not_bind_keeps_the_multiplier_at_zero(cache_root):
    model = make_agent(
        "lagrangian_ppo",
        soft_env(cache_root, budget=1.0),
        seed=0,
        lambda_learning_rate=1.0,
        **SHORT,
    )
    costs = EpisodeCosts()
    model.learn(SHORT["n_steps"], callback=costs)
    assert np.mean(costs.rollouts[0]) < 1.0  # underspent: the ascent step is negative
    assert model.lagrange_multiplier == 0.0
    # a positive multiplier that an underspent rollout would push below 0 stops at 0
    model.lagrange_multiplier = 0.01
    assert model.update_multiplier([0.9, 0.95], 1.0) == pytest.approx(0.925)
    assert model.lagrange_multiplier == 0.0
    model.lagrange_multiplier = 0.3
    assert model.update_multiplier([], 1.0) is None  # no episode ended: no step
    assert model.lagrange_multiplier == 0.3


def test_save_and_load_keep_the_multiplier_and_the_predictions(
    trained, low_budget, cache_root, tmp_path
):
    model, _, _ = trained
    assert model.lagrange_multiplier > 0
    path = save_agent(model, tmp_path / "lagrangian")
    again = load_agent(path, env=low_budget)
    assert type(again) is LagrangianPPO and again.drrl_algo == "lagrangian_ppo"
    assert again.lagrange_multiplier == model.lagrange_multiplier
    assert again.lambda_learning_rate == DUAL_RATE
    seen = observations(low_budget)
    np.testing.assert_array_equal(
        again.predict(seen, deterministic=True)[0], model.predict(seen, deterministic=True)[0]
    )
    # deployed under the wall: the same observation, so the same file loads and acts
    walled = gym.make(ENV_ID, cache_dir=cache_root, max_windows=1, budget=LOW_BUDGET)
    deployed = load_agent(path, env=walled)
    np.testing.assert_array_equal(
        deployed.predict(seen, deterministic=True)[0], model.predict(seen, deterministic=True)[0]
    )
    with pytest.raises(ValueError, match=re.escape(TRAIN_ON_SOFT_BUDGET)):
        deployed.learn(SHORT["n_steps"])  # ... but does not train there
    # training on after loading starts from the saved multiplier
    costs = EpisodeCosts()
    again.learn(SHORT["n_steps"], callback=costs, reset_num_timesteps=False)
    step = DUAL_RATE * (np.mean(costs.rollouts[0]) - LOW_BUDGET)
    assert again.lagrange_multiplier == pytest.approx(
        max(0.0, model.lagrange_multiplier + step), rel=1e-9
    )


def test_defaults_come_from_the_params_dataclass(low_budget):
    model = make_agent("lagrangian_ppo", low_budget)
    defaults = LagrangianPPOParams()
    assert model.lagrange_multiplier == defaults.lambda_init == 0.0
    assert model.lambda_learning_rate == defaults.lambda_learning_rate
    assert model.gamma == BUDGET_DISCOUNT  # a soft budget is still a budget


def test_bad_envs_and_hyperparameters_are_refused(cache_root, low_budget):
    unbudgeted = gym.make("DRRL-Tiny-TopP-v0", cache_dir=cache_root, max_windows=1)
    with pytest.raises(ValueError, match="the env has none.*" + re.escape(TRAIN_ON_SOFT_BUDGET)):
        make_agent("lagrangian_ppo", unbudgeted)
    walled = gym.make(ENV_ID, cache_dir=cache_root, max_windows=1)
    with pytest.raises(
        ValueError, match="this env enforces it.*" + re.escape(TRAIN_ON_SOFT_BUDGET)
    ):
        make_agent("lagrangian_ppo", walled)
    with pytest.raises(ValueError, match=re.escape(TRAIN_ON_SOFT_BUDGET)):
        LagrangianPenalty(DummyVecEnv([lambda: walled]), lambda: 0.0)
    for name, value in (
        ("lambda_learning_rate", -0.1),
        ("lambda_init", -1.0),
        ("lambda_learning_rate", float("nan")),
        ("lambda_init", True),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got"):
            make_agent("lagrangian_ppo", low_budget, **{name: value})

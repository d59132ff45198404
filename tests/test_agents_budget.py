"""Budget baselines: exact knapsacks, feasible schedules, and the ordering they must obey."""

from __future__ import annotations

import itertools
import json

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 (registers the ids)
from agents import evaluate_policy_on_windows
from agents.baselines import SchedulePolicy
from agents.budget_baselines import (
    BestUniformPolicy,
    LagrangianGreedyPolicy,
    StaticAllocationPolicy,
    cost_units,
    dp_schedule,
    fidelity_values,
    knapsack,
    realised_costs,
    tune_price,
)


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("budget-cache"))
    train = gym.make("DRRL-Tiny-Budget-v0", cache_dir=cache, max_windows=3)
    held_out = gym.make("DRRL-Tiny-Budget-v0", cache_dir=cache, max_windows=2, split="eval")
    return train, held_out


def brute_force(values, costs, cap):
    best, best_choice = -np.inf, None
    for choice in itertools.product(*(range(values.shape[1]) for _ in range(len(values)))):
        index = (np.arange(len(values)), list(choice))
        if costs[index].sum() <= cap and values[index].sum() > best:
            best, best_choice = values[index].sum(), choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_is_exact_on_integer_costs(seed):
    rng = np.random.default_rng(seed)
    values = rng.random((5, 3))
    costs = rng.integers(1, 6, size=(5, 3)).astype(float)
    cap = float(costs.min(axis=1).sum() + rng.integers(0, 8))
    chosen = knapsack(values, costs, cap, bins=int(cap))  # unit cost 1: no rounding
    best, _ = brute_force(values, costs, cap)
    index = (np.arange(5), chosen)
    assert costs[index].sum() <= cap
    assert values[index].sum() == pytest.approx(best)


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="exceeds the budget"):
        knapsack(np.ones((2, 2)), np.full((2, 2), 3.0), cap=5.0)


def episode(env, actions, window):
    env.reset(options={"window": window})
    total, info = 0.0, {}
    for action in np.asarray(actions).flatten():
        _, reward, _, _, info = env.step(int(action))
        total += reward
    return total, info["episode_summary"]


def test_dp_schedule_is_feasible_and_beats_every_other_schedule(envs):
    _, held_out = envs
    base = held_out.unwrapped
    values = fidelity_values(held_out)  # (W, S, L, A)
    rng = np.random.default_rng(0)
    for window in range(2):
        schedule = dp_schedule(held_out, window)
        value, summary = episode(held_out, schedule, window)
        assert summary["masked_actions"] == 0  # the wall agrees: the schedule is feasible
        assert summary["flops_ratio"] <= base.config.budget + 1e-9
        cells = np.take_along_axis(values[window], schedule[..., None], -1).sum()
        assert value == pytest.approx(cells)
        for _ in range(20):  # no random policy, walled to feasibility, does better
            random_value, _ = episode(held_out, rng.integers(0, 15, size=16), window)
            assert random_value <= value + 1e-9
        uniform = BestUniformPolicy(held_out, envs[0])
        assert episode(held_out, [uniform.action] * 16, window)[0] <= value + 1e-9


def test_best_uniform_is_the_best_feasible_single_action(envs):
    train, held_out = envs
    policy = BestUniformPolicy(held_out, train)
    base = held_out.unwrapped
    cost = base.costs.executed.sum(axis=0) * base.n_layers
    mean = fidelity_values(train).mean(axis=(0, 1, 2))
    feasible = cost <= base.wall.cap
    assert feasible[policy.action]
    assert mean[policy.action] == mean[feasible].max()
    frame = evaluate_policy_on_windows(policy, held_out, [0, 1])
    assert (frame.masked_actions == 0).all() and (frame.flops_ratio <= 0.6 + 1e-9).all()


def test_static_allocation_is_one_action_per_layer_within_budget(envs):
    train, held_out = envs
    policy = StaticAllocationPolicy(held_out, train)
    base = held_out.unwrapped
    assert policy.allocation.shape == (base.n_layers,)
    cost = base.costs.executed.sum(axis=0)[policy.allocation].sum()
    assert cost <= base.wall.cap * (1 + 1e-9)
    frame = evaluate_policy_on_windows(policy, held_out, [0, 1])
    assert (frame.masked_actions == 0).all()
    for actions in frame["actions"]:
        table = np.array(json.loads(actions))  # (S, L): the same action down every layer's column
        assert (table == policy.allocation[None, :]).all()
    # Per-layer choices can only do better than the best single action on the train values.
    values = fidelity_values(train).mean(axis=0).sum(axis=0)  # (L, A)
    uniform = BestUniformPolicy(held_out, train).action
    assert values[np.arange(base.n_layers), policy.allocation].sum() >= values[:, uniform].sum()


def test_lagrangian_price_meets_the_budget_on_train_windows(envs):
    train, held_out = envs
    values, costs = fidelity_values(train), cost_units(train)
    price = tune_price(values, costs, 0.6)
    assert price > 0
    chosen = np.argmax(values - price * costs[None, :, None, :], axis=-1)
    spent = np.take_along_axis(np.broadcast_to(costs[None, :, None, :], values.shape),
                               chosen[..., None], -1).mean()  # fmt: skip
    assert spent <= 0.6
    cheaper = np.argmax(values - 0.9 * price * costs[None, :, None, :], axis=-1)
    assert (cheaper != chosen).any()  # a lower price spends more
    policy = LagrangianGreedyPolicy(held_out, train)
    frame = evaluate_policy_on_windows(policy, held_out, [0, 1])
    assert (frame.flops_ratio <= 0.6 + 1e-9).all()
    pairs = zip(frame.window, frame.actions, strict=True)
    schedules = {window: np.array(json.loads(actions)) for window, actions in pairs}
    replayed = evaluate_policy_on_windows(
        SchedulePolicy(held_out, schedules, "x"), held_out, [0, 1]
    )
    np.testing.assert_array_equal(replayed["return"], frame["return"])


def test_budget_baselines_need_a_budgeted_cached_env(envs, tmp_path):
    train, _ = envs
    plain = gym.make("DRRL-Tiny-TopK-v0", cache_dir=str(tmp_path), max_windows=1)
    with pytest.raises(ValueError, match="budgeted env"):
        BestUniformPolicy(plain, train)
    live = gym.make("DRRL-Tiny-Budget-v0", cache_dir=str(tmp_path), max_windows=1, backend="live")
    with pytest.raises(ValueError, match="cached"):
        LagrangianGreedyPolicy(live, train)
    with pytest.raises(ValueError, match="cached"):
        fidelity_values(live)


@pytest.fixture(scope="module")
def topp_envs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("budget-topp-cache"))
    kwargs = {"cache_dir": cache, "max_windows": 2}
    train = gym.make("DRRL-Tiny-TopP-Budget-v0", **kwargs)
    held_out = gym.make("DRRL-Tiny-TopP-Budget-v0", split="eval", **kwargs)
    return train, held_out


def test_budget_baselines_plan_with_realised_costs_when_costs_depend_on_the_input(topp_envs):
    train, held_out = topp_envs
    base = held_out.unwrapped
    assert not base.costs.static
    realised = realised_costs(held_out)  # (W, S, L, A)
    bound = np.broadcast_to(base.costs.executed[None, :, None, :], realised.shape)
    assert (realised <= bound * (1 + 1e-12)).all() and (realised < bound).any()
    np.testing.assert_array_equal(realised, held_out.unwrapped.rollout("flops"))
    values = fidelity_values(held_out)
    actions = len(base.actions)
    for window in range(2):
        schedule = dp_schedule(held_out, window)
        cells = (*np.indices(schedule.shape), schedule)
        assert realised[window][cells].sum() <= base.wall.cap * (1 + 1e-9)
        # planning with the upper bounds can only do worse: its schedules are a subset
        by_bound = knapsack(
            values[window].reshape(-1, actions), bound[window].reshape(-1, actions), base.wall.cap
        ).reshape(schedule.shape)
        assert values[window][cells].sum() >= values[window][(*cells[:2], by_bound)].sum() - 1e-9
        _, summary = episode(held_out, schedule, window)
        assert summary["flops_ratio"] <= base.config.budget + 1e-9  # the wall holds regardless
    # the deployable baselines are fitted on the train windows' realised costs
    train_costs = realised_costs(train)
    uniform = BestUniformPolicy(held_out, train)
    episode_cost = train_costs.sum(axis=(1, 2)).mean(axis=0)
    feasible = episode_cost <= base.wall.cap * (1 + 1e-9)
    mean = fidelity_values(train).mean(axis=(0, 1, 2))
    assert mean[uniform.action] == mean[feasible].max()
    static = StaticAllocationPolicy(held_out, train)
    per_layer = train_costs.mean(axis=0).sum(axis=0)  # (L, A)
    assert per_layer[np.arange(base.n_layers), static.allocation].sum() <= base.wall.cap * (
        1 + 1e-9
    )


def test_realised_costs_of_a_static_method_are_its_cost_table(envs):
    _, held_out = envs
    base = held_out.unwrapped
    costs = realised_costs(held_out)
    assert costs.shape == (base.n_windows, base.n_segments, base.n_layers, len(base.actions))
    for layer in range(base.n_layers):
        np.testing.assert_array_equal(costs[:, :, layer, :], np.broadcast_to(
            base.costs.executed, costs[:, :, layer, :].shape))  # fmt: skip


def test_allocation_measurements_are_the_fidelity_and_realised_flops_per_episode(topp_envs):
    """What the allocations read: the cosine term and realised FLOPs / exact episode FLOPs."""
    from agents.allocations import measurements

    _, held_out = topp_envs
    base = held_out.unwrapped
    values, costs = measurements(held_out)
    assert values.dtype == costs.dtype == np.float64
    np.testing.assert_array_equal(values, base.rollout("cosine").astype(np.float64))
    episode_full = float(base.costs.full.sum() * base.n_layers)
    np.testing.assert_allclose(costs, base.rollout("flops") / episode_full, rtol=1e-15)
    # exact attention keeps every causal key: it realises its cost table's entry (its bound)
    exact = base.actions.full_action
    expected = base.costs.executed[:, exact] / episode_full  # (S,)
    np.testing.assert_allclose(costs[..., exact], np.broadcast_to(
        expected[None, :, None], costs.shape[:3]), rtol=1e-12)  # fmt: skip
    live = gym.make("DRRL-Tiny-TopP-Budget-v0", cache_dir=base.config.cache_dir, backend="live")
    with pytest.raises(ValueError, match="cached"):
        measurements(live)

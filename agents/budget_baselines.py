"""Baselines of budgeted episodes, behind the same ``predict`` as every policy.

In a budgeted episode (``budget=b``) the reward is the fidelity term alone and the action
wall caps the executed attention FLOPs at ``b`` times exact attention's. Cells are then
independent given the budget (no perturbation term), so the teacher-forced problem of one
window is a multiple-choice knapsack: one action per (segment, layer), values from the
cached fidelity terms, costs the FLOPs each action realised there (:func:`realised_costs`:
the cost table for static methods, the cached measurements for input-dependent ones such as
``topp``, whose cost table holds only upper bounds), a cap on the summed cost. A schedule
fitted on train windows meets the budget on their mean; on a window that needs more keys the
env's wall replaces the actions that no longer fit (``masked_actions`` counts them).

- :class:`BestUniformPolicy`: the one action, the same at every step, with the best mean
  fidelity on train windows among those whose episode cost meets the budget (deployable);
- :class:`StaticAllocationPolicy`: one action per layer (every segment), chosen from
  per-layer sensitivities measured on train windows by an exact knapsack over layers
  (Eigen Attention and Palu allocate ranks per layer this way; deployable: it reads only
  the layer from the observation);
- :class:`LagrangianGreedyPolicy`: at each step, the allowed action of best
  ``fidelity - price * cost``, from the cached lookups of the step, with the price tuned
  on train windows so that episodes meet the budget on average (not deployable: it looks
  up the fidelity of every action, like the greedy oracle);
- :func:`dp_schedule`: the exact optimum of the teacher-forced problem of one window, by
  dynamic programming over the cost (not deployable; an upper reference for the agents).

Budget values come from the cached backend (``backend='cached'``); deployable baselines
then act on any env of the same action grid and budget, the live one included.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from agents.baselines import BaselinePolicy, dynamic_rank_env
from drrl_env.inspect import rollout_array

COST_BINS = 4000
"""Resolution of the dynamic programs: costs are rounded up to 1/COST_BINS of the budget
(rounding up keeps every schedule found feasible; it may miss one within that rounding)."""


def budgeted_env(env: gym.Env) -> gym.Env:
    """``env.unwrapped``, checked to be a dynamic-rank env with a budget."""
    base = dynamic_rank_env(env)
    if base.wall is None:
        raise ValueError("budget baselines need a budgeted env: gym.make(..., budget=b)")
    return base


def fidelity_values(env: gym.Env) -> np.ndarray:
    """The fidelity term of every action at every cell of every window, (W, S, L, A).

    Reads the cached raw measurements and applies the env's fidelity term (e.g. the
    ``loss`` term's ``1 - steps * dnll``).

    Raises:
        ValueError: The env's backend is not the cached one.
    """
    base = dynamic_rank_env(env)
    if not base.teacher_forced:
        raise ValueError("fidelity values are cached lookups: build it with backend='cached'")
    term = base.reward_function.fidelity
    return term.value(rollout_array(base, term.raw), base.steps)


def realised_costs(env: gym.Env) -> np.ndarray:
    """The FLOPs each action realised at every cell of every cached window, (W, S, L, A).

    With input-dependent costs (``topp``: the keys kept follow the attention mass) these are
    the cached measurements; the cost table holds only each action's upper bound (every
    causal key kept), which the budget wall plans with. With static costs they are the cost
    table, the same at every window and layer.

    Raises:
        ValueError: Input-dependent costs and an env whose backend is not the cached one.
    """
    base = dynamic_rank_env(env)
    shape = (base.n_windows, base.n_segments, base.n_layers, len(base.actions))
    if base.costs.static:
        return np.broadcast_to(base.costs.executed[None, :, None, :], shape).astype(np.float64)
    if not base.teacher_forced:
        raise ValueError("realised FLOPs are cached lookups: build it with backend='cached'")
    return np.asarray(base.rollout("flops"), dtype=np.float64)


def knapsack(values: np.ndarray, costs: np.ndarray, cap: float, bins: int = COST_BINS):
    """Exact multiple-choice knapsack: one choice per item maximising value within ``cap``.

    Args:
        values: (items, choices) value of each choice.
        costs: (items, choices) cost of each choice (>= 0).
        cap: The budget of the summed cost.
        bins: Cost resolution: costs are rounded up to multiples of ``cap / bins``.

    Returns:
        (items,) the choice of each item.

    Raises:
        ValueError: Even the cheapest choices exceed ``cap``.
    """
    picks, units = knapsack_table(values, costs, cap, bins)
    chosen, left = np.zeros(len(picks), dtype=np.int64), bins
    for item in range(len(picks)):
        chosen[item] = picks[item, left]
        left -= units[item, chosen[item]]
    return chosen


def knapsack_table(
    values: np.ndarray, costs: np.ndarray, cap: float, bins: int = COST_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """The dynamic programme behind :func:`knapsack`, for every amount of budget left.

    Returns:
        ``picks`` (items, bins + 1): the optimal choice of item ``i`` when ``u`` cost units
        are left for items ``i, i+1, ...`` (one unit is ``cap / bins``), and ``units``
        (items, choices): each choice's cost in units, rounded up. Following ``picks`` from
        any state is the optimum of the rest, which is what an expert queried at a state a
        learner reached (DAgger) answers.

    Raises:
        ValueError: Even the cheapest choices exceed ``cap``.
    """
    values, costs = np.asarray(values, np.float64), np.asarray(costs, np.float64)
    units = np.ceil(costs / (cap / bins) - 1e-9).astype(np.int64)  # (items, choices)
    items, choices = values.shape
    if units.min(axis=1).sum() > bins:
        raise ValueError("the cheapest choice of every item already exceeds the budget")
    best = np.zeros(bins + 1)  # value of the items after this one, given the units left
    picks = np.zeros((items, bins + 1), dtype=np.int64)
    budget = np.arange(bins + 1)
    for item in range(items - 1, -1, -1):
        candidates = np.full((choices, bins + 1), -np.inf)
        for choice in range(choices):
            left = budget - units[item, choice]
            fits = left >= 0
            candidates[choice, fits] = values[item, choice] + best[left[fits]]
        picks[item] = np.argmax(candidates, axis=0)
        best = candidates.max(axis=0)
    return picks, units


def dp_schedule(env: gym.Env, window: int) -> np.ndarray:
    """The teacher-forced optimum of ``window``: actions (S, L) of the highest summed
    fidelity whose realised FLOPs (:func:`realised_costs`) meet the budget (:func:`knapsack`
    over the cells)."""
    base = budgeted_env(env)
    values = fidelity_values(env)[window]  # (S, L, A)
    costs = realised_costs(env)[window]  # (S, L, A)
    actions = len(base.actions)
    chosen = knapsack(values.reshape(-1, actions), costs.reshape(-1, actions), base.wall.cap)
    return chosen.reshape(base.n_segments, base.n_layers)


class BestUniformPolicy(BaselinePolicy):
    """The same action at every step: the best mean fidelity among those meeting the budget.

    Args:
        env: The budgeted env it acts in.
        train_env: A cached env of the same grid on train windows (the measurements).
    """

    name = "best_uniform"

    def __init__(self, env: gym.Env, train_env: gym.Env) -> None:
        super().__init__(env)
        base = budgeted_env(env)
        check_same_grid(base, train_env)
        mean = fidelity_values(train_env).mean(axis=(0, 1, 2))  # (A,)
        episode_cost = realised_costs(train_env).sum(axis=(1, 2)).mean(axis=0)  # (A,)
        feasible = episode_cost <= base.wall.cap * (1 + 1e-9)
        if not feasible.any():
            raise ValueError(f"no action meets budget={base.config.budget} at every step")
        self.action = int(np.argmax(np.where(feasible, mean, -np.inf)))

    def choose(self, observation: np.ndarray) -> int:
        return self.action


class StaticAllocationPolicy(BaselinePolicy):
    """One action per layer, from per-layer sensitivities and an exact knapsack over layers.

    Args:
        env: The budgeted env it acts in.
        train_env: A cached env of the same grid on train windows (the measurements).
    """

    name = "static_allocation"

    def __init__(self, env: gym.Env, train_env: gym.Env) -> None:
        super().__init__(env)
        base = budgeted_env(env)
        check_same_grid(base, train_env)
        sensitivity = fidelity_values(train_env).mean(axis=0).sum(axis=0)  # (L, A)
        per_layer = realised_costs(train_env).mean(axis=0).sum(axis=0)  # (L, A)
        self.allocation = knapsack(sensitivity, per_layer, base.wall.cap)  # (L,)
        self.n_layers = base.n_layers

    def choose(self, observation: np.ndarray) -> int:
        position = float(observation[self.layout.slices["layer"]][0])
        return int(self.allocation[round(position * max(self.n_layers - 1, 1))])


class LagrangianGreedyPolicy(BaselinePolicy):
    """At each step the allowed action of best ``fidelity - price * cost`` (cached lookups).

    Like the greedy oracle it reads the env it was built with (one observation at a time,
    in step with the episode). The price is tuned by bisection on the train windows: the
    lowest price at which the mean episode cost of the unconstrained choices meets the
    budget.

    Args:
        env: The cached, budgeted env it acts in.
        train_env: A cached env of the same grid on train windows.
    """

    name = "lagrangian_greedy"

    def __init__(self, env: gym.Env, train_env: gym.Env) -> None:
        super().__init__(env)
        base = budgeted_env(env)
        check_same_grid(base, train_env)
        if not base.teacher_forced:
            raise ValueError("the Lagrangian greedy looks up every action: backend='cached'")
        self.env = base
        train_costs = realised_costs(train_env) / base.costs.full.mean()  # (W, S, L, A)
        self.price = tune_price(fidelity_values(train_env), train_costs, base.config.budget)

    def choose(self, observation: np.ndarray) -> int:
        return self.act(observation, None)

    def act(self, observation: np.ndarray, mask: np.ndarray | None) -> int:
        values = self.env.candidate_values()
        allowed = self.env.action_masks() if mask is None else mask & self.env.action_masks()
        segment = self.env.step_index // self.env.n_layers
        full = self.env.costs.full
        costs = values["flops_ratio"] * full[segment] / full.mean()  # realised, cost units
        score = values["fidelity"] - self.price * costs
        return int(np.argmax(np.where(allowed, score, -np.inf)))

    def predict(self, observation, state=None, episode_start=None, deterministic=True, **kw):
        if np.asarray(observation).ndim > 1 and len(observation) > 1:
            raise ValueError("the Lagrangian greedy acts on its own env: one observation at a time")
        return super().predict(observation, state, episode_start, deterministic, **kw)


def cost_units(env: gym.Env) -> np.ndarray:
    """(S, A) executed FLOPs of each action at each segment over the mean exact FLOPs of a
    call: the mean of these over an episode's cells is its executed / exact FLOPs ratio."""
    base = dynamic_rank_env(env)
    return base.costs.executed / base.costs.full.mean()


def tune_price(values: np.ndarray, costs: np.ndarray, budget: float, steps: int = 60) -> float:
    """The lowest FLOPs price whose greedy choices meet ``budget`` on average.

    Args:
        values: (W, S, L, A) fidelity of every action at every cell.
        costs: (S, A) :func:`cost_units` of every action at each segment, or (W, S, L, A)
            the realised costs of every cell in the same units.
        budget: Fraction of exact attention FLOPs.
        steps: Bisection steps.
    """
    costs = np.asarray(costs)
    if costs.ndim == 2:
        costs = costs[None, :, None, :]
    costs = np.broadcast_to(costs, values.shape)  # (W, S, L, A)

    def mean_cost(price: float) -> float:
        chosen = np.argmax(values - price * costs, axis=-1)[..., None]  # (W, S, L, 1)
        return float(np.take_along_axis(costs, chosen, -1).mean())

    low, high = 0.0, 1.0
    while mean_cost(high) > budget and high < 1e6:
        high *= 2
    if mean_cost(low) <= budget:
        return low
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if mean_cost(middle) <= budget else (middle, high)
    return high


def check_same_grid(base: gym.Env, train_env: gym.Env) -> None:
    """ValueError unless ``train_env`` has ``base``'s action grid and is cached."""
    train = dynamic_rank_env(train_env)
    if train.actions != base.actions:
        raise ValueError("train_env has another action grid than the env the policy acts in")
    if not train.teacher_forced:
        raise ValueError("train_env must be cached (its measurements are lookups)")

"""Schedules under a FLOPs budget with input-dependent costs, fitted on cached measurements.

Every function here reads two arrays of the cached rollouts of some windows (teacher
forced): ``values`` (W, S, L, A), the fidelity of each action at each (segment, layer) cell,
and ``costs`` (W, S, L, A), the FLOPs each action *realised* at that cell as a fraction of
an episode's exact attention FLOPs (so a schedule's episode cost is the sum of its cells'
costs, and the budget ``b`` caps that sum). With ``topp`` the cost of an action depends on
the window; a deployable schedule is fitted on train windows to meet the budget *on their
mean*, so it may overspend on a window that needs more keys (the tables report the realised
FLOPs beside the quality). The per-window optimum alone sees the window it is scored on.

Schedules are (S, L) action tables:

- :func:`best_uniform`: one action everywhere; the best mean value among those whose mean
  cost meets the budget.
- :func:`global_mass_rule`: one rank and one mass target everywhere, the training-free rule
  of top-p attention: the largest ``p`` (at the given rank) whose mean cost meets the
  budget.
- :func:`static_per_layer`: one action per layer, by an exact knapsack over layers of the
  mean values and costs.
- :func:`random_search` and :func:`greedy_search`: per-layer allocations found by search,
  each allowed ``evaluations`` evaluations of a candidate on the train windows.
- :func:`per_window_optimum`: the exact knapsack over the cells of one window, with that
  window's own values and costs (not deployable: the ceiling of adaptivity).

:func:`measurements` reads both arrays from a cached env.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agents.budget_baselines import fidelity_values, knapsack, realised_costs

FEASIBLE_SLACK = 1e-9


def measurements(env) -> tuple[np.ndarray, np.ndarray]:
    """``(values, costs)`` of every window of a cached env, each (W, S, L, A): the env's
    fidelity term and the FLOPs each action realised, as a fraction of an episode's exact
    attention FLOPs.

    Raises:
        ValueError: The env's backend is not the cached one.
    """
    base = env.unwrapped
    return fidelity_values(base), realised_costs(base) / base.episode_full_flops


@dataclass(frozen=True)
class Problem:
    """Cached measurements of the windows a schedule is fitted on.

    Attributes:
        values: (W, S, L, A) fidelity of each action at each cell.
        costs: (W, S, L, A) realised FLOPs of each action at each cell / episode exact FLOPs.
        budget: Cap of an episode's summed cost (fraction of exact attention FLOPs).
    """

    values: np.ndarray
    costs: np.ndarray
    budget: float

    def __post_init__(self) -> None:
        if self.values.shape != self.costs.shape or self.values.ndim != 4:
            raise ValueError(
                f"values {self.values.shape} and costs {self.costs.shape} must both be "
                "(windows, segments, layers, actions)"
            )
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """(segments, layers) of a schedule."""
        return self.values.shape[1], self.values.shape[2]

    def layer_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, A) mean over windows of each action's summed value and cost over a layer's
        segments: the value and cost of giving a whole layer one action."""
        return self.values.mean(axis=0).sum(axis=0), self.costs.mean(axis=0).sum(axis=0)

    def score(self, schedule: np.ndarray) -> tuple[float, float]:
        """(mean summed value, mean summed cost) of an (S, L) schedule over the windows."""
        index = np.asarray(schedule)[None, ..., None]
        index = np.broadcast_to(index, (*self.values.shape[:3], 1))
        value = np.take_along_axis(self.values, index, axis=-1).sum(axis=(1, 2, 3))
        cost = np.take_along_axis(self.costs, index, axis=-1).sum(axis=(1, 2, 3))
        return float(value.mean()), float(cost.mean())

    def fits(self, cost: float) -> bool:
        return cost <= self.budget * (1 + FEASIBLE_SLACK)

    def floor(self) -> float:
        """The mean cost of the cheapest action at every cell (each window's own cheapest)."""
        return float(self.costs.min(axis=-1).sum(axis=(1, 2)).mean())

    def per_layer(self, allocation: np.ndarray) -> np.ndarray:
        """The (S, L) schedule giving layer ``l`` action ``allocation[l]`` at every segment."""
        return np.broadcast_to(np.asarray(allocation, dtype=np.int64), self.shape).copy()


def _check_floor(problem: Problem) -> None:
    if not problem.fits(problem.floor()):
        raise ValueError(
            f"budget {problem.budget:g} is below the cheapest schedule's mean cost "
            f"{problem.floor():.3f} on these windows"
        )


def best_uniform(problem: Problem) -> np.ndarray:
    """One action at every cell: the best mean value among those meeting the budget.

    Raises:
        ValueError: No single action meets the budget on the windows' mean.
    """
    values, costs = problem.layer_totals()
    value, cost = values.sum(axis=0), costs.sum(axis=0)  # (A,)
    feasible = cost <= problem.budget * (1 + FEASIBLE_SLACK)
    if not feasible.any():
        raise ValueError(
            f"no single action meets budget {problem.budget:g} (mean {cost.min():.3f})"
        )
    return problem.per_layer(
        np.full(problem.shape[1], int(np.argmax(np.where(feasible, value, -np.inf))))
    )


def global_mass_rule(problem: Problem, candidates: np.ndarray) -> np.ndarray:
    """The training-free top-p rule: among ``candidates`` (action indices ordered from the
    lowest to the highest mass target, at one rank), the last whose mean cost meets the
    budget, at every cell.

    Raises:
        ValueError: Even the first candidate overspends.
    """
    _, costs = problem.layer_totals()
    cost = costs.sum(axis=0)
    chosen = None
    for action in candidates:
        if problem.fits(float(cost[action])):
            chosen = int(action)
    if chosen is None:
        raise ValueError(f"no mass target of the rule meets budget {problem.budget:g}")
    return problem.per_layer(np.full(problem.shape[1], chosen))


def static_per_layer(problem: Problem) -> np.ndarray:
    """One action per layer: the exact knapsack over layers of mean values and costs."""
    _check_floor(problem)
    values, costs = problem.layer_totals()
    return problem.per_layer(knapsack(values, costs, problem.budget))


def random_search(problem: Problem, evaluations: int, seed: int = 0) -> np.ndarray:
    """The best of ``evaluations`` uniformly random per-layer allocations that meet the budget
    on the windows' mean; the cheapest allocation if none does.

    Raises:
        ValueError: ``evaluations`` < 1.
    """
    if evaluations < 1:
        raise ValueError(f"evaluations must be >= 1, got {evaluations}")
    _check_floor(problem)
    rng = np.random.default_rng(seed)
    layers, actions = problem.shape[1], problem.values.shape[-1]
    _, costs = problem.layer_totals()
    best, best_value = problem.per_layer(costs.argmin(axis=1)), -np.inf
    for _ in range(evaluations):
        schedule = problem.per_layer(rng.integers(actions, size=layers))
        value, cost = problem.score(schedule)
        if problem.fits(cost) and value > best_value:
            best, best_value = schedule, value
    return best


def layer_frontiers(values: np.ndarray, costs: np.ndarray) -> list[np.ndarray]:
    """Per layer, the actions on the value/cost frontier: sorted by cost, each costlier one
    worth strictly more (an action that costs more and is worth no more is never useful).

    Args:
        values, costs: (L, A) a layer's value and cost of each action.
    """
    frontiers = []
    for layer_values, layer_costs in zip(values, costs, strict=True):
        order = np.lexsort((-layer_values, layer_costs))
        kept, best = [], -np.inf
        for action in order:
            if layer_values[action] > best:
                kept.append(action)
                best = layer_values[action]
        frontiers.append(np.array(kept, dtype=np.int64))
    return frontiers


def greedy_search(problem: Problem, evaluations: int) -> np.ndarray:
    """Per-layer allocation by greedy upgrades, at most ``evaluations`` candidate evaluations.

    Starts from each layer's cheapest action. Each round evaluates, for every layer, the
    next action of its :func:`layer_frontiers` (one evaluation each on the windows, until
    the allowance runs out) and keeps the feasible one of best value gained per cost added;
    it stops when no upgrade is feasible and better.

    Raises:
        ValueError: ``evaluations`` < 1.
    """
    if evaluations < 1:
        raise ValueError(f"evaluations must be >= 1, got {evaluations}")
    _check_floor(problem)
    frontiers = layer_frontiers(*problem.layer_totals())
    position = np.zeros(len(frontiers), dtype=np.int64)

    def allocation_at(steps: np.ndarray) -> np.ndarray:
        return np.array([f[i] for f, i in zip(frontiers, steps, strict=True)])

    value, cost = problem.score(problem.per_layer(allocation_at(position)))
    used = 1
    while used < evaluations:
        best, best_gain = None, 0.0
        for layer, frontier in enumerate(frontiers):
            if position[layer] + 1 >= len(frontier) or used >= evaluations:
                continue
            trial = position.copy()
            trial[layer] += 1
            trial_value, trial_cost = problem.score(problem.per_layer(allocation_at(trial)))
            used += 1
            if not problem.fits(trial_cost) or trial_value <= value:
                continue
            gain = (trial_value - value) / max(trial_cost - cost, 1e-12)
            if gain > best_gain:
                best, best_gain = (trial, trial_value, trial_cost), gain
        if best is None:
            break
        position, value, cost = best
    return problem.per_layer(allocation_at(position))


def per_window_optimum(values: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """The exact optimum of one window: (S, L) actions of the highest summed value whose
    summed realised cost meets ``budget`` (a knapsack over the cells).

    Args:
        values: (S, L, A) that window's values.
        costs: (S, L, A) that window's realised costs (fractions of the episode's exact FLOPs).
        budget: The cap.
    """
    segments, layers, actions = values.shape
    chosen = knapsack(values.reshape(-1, actions), costs.reshape(-1, actions), budget)
    return chosen.reshape(segments, layers)

"""The action wall of budgeted episodes (after AMC and HAQ): every episode stays feasible.

With a budget ``b``, an episode may execute at most ``b`` times the exact attention FLOPs of
the whole window. Before each step, an action is allowed only if, after it, the cheapest
action at every remaining step still fits: ``spent + cost(action) + min_future <= cap``.
The cheapest schedule is feasible at reset (else the budget is refused), so some action is
always allowed, and the episode ends within budget whatever the agent does.

Input-dependent costs (``topp``: the keys kept follow the attention mass, so an action's
FLOPs are known only once it ran): ``cost(action)`` is then the action's upper bound (every
causal key kept) and ``min_future`` the cheapest bound of each remaining step (the floor
action ``keep = 0``, whose cost is static), while ``spent`` is what the steps so far
realised. An action is allowed only if even its worst case leaves room for the floor at
every remaining step, so the final spend never exceeds the budget; when no other action
fits, the floor is forced. Realised spend below the bounds returns to the agent as room
for later steps.
"""

from __future__ import annotations

import numpy as np

from drrl_env.envs.backends.base import CostTable

RELATIVE_SLACK = 1e-9
"""Round-off slack of the feasibility test, relative to the cap."""


class BudgetWall:
    """Feasibility masks of a budget over an episode of ``n_layers`` calls per segment.

    Args:
        costs: FLOPs of every action at every segment (one layer call).
        n_layers: Layer calls per segment.
        budget: Fraction of the episode's exact attention FLOPs, in (0, 1].

    Raises:
        ValueError: ``budget`` is below the cheapest schedule (the message gives the
            minimum).
    """

    def __init__(self, costs: CostTable, n_layers: int, budget: float) -> None:
        self.executed = np.asarray(costs.executed, dtype=np.float64)  # (S, A)
        self.n_layers = n_layers
        self.episode_full = float(costs.full.sum() * n_layers)
        self.cap = budget * self.episode_full
        cheapest = np.repeat(self.executed.min(axis=1), n_layers)  # (S * L,)
        # min_future[t]: cheapest cost of steps t, t+1, ..., end.
        self.min_future = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])
        minimum = self.min_future[0] / self.episode_full
        if self.min_future[0] > self.cap * (1 + RELATIVE_SLACK):
            raise ValueError(
                f"budget={budget} is below what the cheapest action at every step executes: "
                f"the minimum is {minimum:.4f} of exact attention FLOPs for this method, grid "
                "and window length"
            )
        self.minimum = minimum

    def allowed(self, step: int, spent: float) -> np.ndarray:
        """(A,) actions that keep the episode feasible at ``step`` after ``spent`` FLOPs."""
        segment = step // self.n_layers
        after = spent + self.executed[segment] + self.min_future[step + 1]
        return after <= self.cap * (1 + RELATIVE_SLACK)

    def left(self, spent: float) -> float:
        """FLOPs of the budget not yet spent (never negative)."""
        return max(self.cap - spent, 0.0)

    def replacement(self, step: int, allowed: np.ndarray) -> int:
        """The action a disallowed request becomes: the most expensive allowed one."""
        costs = np.where(allowed, self.executed[step // self.n_layers], -np.inf)
        return int(np.argmax(costs))

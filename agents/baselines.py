"""Baseline policies behind SB3's ``predict`` interface.

Every baseline is built from the env it will act in (its rank grid and observation layout)
and answers ``predict(observation, state, episode_start, deterministic, action_masks)`` with
``(action, state)`` like an SB3 model, so the leaderboard treats both alike:

- :class:`FullRankPolicy`: always the last action (full rank, exact attention);
- :class:`StaticRankPolicy`: one fixed rank of the grid at every step;
- :class:`UniformRandomPolicy`: a uniformly random action (among the allowed ones if masks
  are given);
- :class:`EnergyThresholdPolicy`: the smallest candidate rank retaining at least ``tau`` of
  the spectral energy (the DR-RL paper's "Adaptive SVD" row), read from the observation;
- :class:`GreedyOraclePolicy`: the action of best immediate reward, looked up in the cached
  backend (``candidate_rewards``): an upper reference, not a deployable policy.

When ``action_masks`` is given, a masked choice is replaced the way the environment's
guardrail does it (the smallest allowed action above it), so a baseline never returns a
masked action; without masks the env's guardrail applies at ``step``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from drrl_env.envs.observation import ObservationLayout
from drrl_env.methods.base import Setting


class BaselinePolicy:
    """Common ``predict`` of the baselines; subclasses implement ``choose``.

    Args:
        env: The dynamic-rank env (wrapped or not) the policy acts in.
    """

    name = "baseline"

    def __init__(self, env: gym.Env) -> None:
        base = dynamic_rank_env(env)
        self.ranks: tuple[int, ...] = tuple(base.ranks)
        self.layout: ObservationLayout = base.layout
        self.n_actions = len(self.ranks)

    def choose(self, observation: np.ndarray) -> int:
        """The requested action for one observation."""
        raise NotImplementedError

    def act(self, observation: np.ndarray, mask: np.ndarray | None) -> int:
        """The action for one observation, moved off a masked action if ``mask`` is given."""
        return unmasked(self.choose(observation), mask)

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Any]:
        """Actions for one observation (shape ``(obs,)``) or a batch (``(n, obs)``).

        Returns:
            ``(actions, state)``: an int64 array of shape ``()`` or ``(n,)``, and ``state``
            unchanged (the baselines are stateless).

        Raises:
            ValueError: The observation does not have the env's size.
        """
        batch = np.asarray(observation, dtype=np.float32)
        single = batch.ndim == 1
        batch = batch.reshape(1, -1) if single else batch
        if batch.ndim != 2 or batch.shape[1] != self.layout.size:
            raise ValueError(
                f"observation of shape {np.shape(observation)} does not match the env's "
                f"observation size {self.layout.size}"
            )
        masks = _batch_masks(action_masks, len(batch), self.n_actions)
        actions = np.array(
            [self.act(obs, None if masks is None else masks[i]) for i, obs in enumerate(batch)],
            dtype=np.int64,
        )
        return (actions.squeeze(0) if single else actions), state


class StaticRankPolicy(BaselinePolicy):
    """The same action at every step: a rank (and, on a pair grid, a keep fraction).

    Args:
        env: The env it acts in.
        rank: A rank of the grid.
        keep: The keep fraction, needed when the grid pairs ranks with several keeps.

    Raises:
        ValueError: The setting is not in the env's grid (the message lists the grid).
    """

    def __init__(self, env: gym.Env, rank: int, keep: float | None = None) -> None:
        super().__init__(env)
        grid = dynamic_rank_env(env).actions
        if (
            isinstance(rank, bool)
            or not isinstance(rank, int | np.integer)
            or rank not in grid.ranks
        ):
            raise ValueError(f"rank={rank!r} is not in the env's grid {self.ranks}")
        self.action = grid.index(rank if keep is None else Setting(int(rank), float(keep)))
        self.rank = int(rank)
        self.name = f"static_{grid.settings[self.action].label()[1:]}"

    def choose(self, observation: np.ndarray) -> int:
        return self.action


class FullRankPolicy(StaticRankPolicy):
    """Exact attention: the last action at every step."""

    def __init__(self, env: gym.Env) -> None:
        base = dynamic_rank_env(env)
        super().__init__(env, base.actions.settings[-1].rank, base.actions.settings[-1].keep)
        self.name = "full_rank"


class UniformRandomPolicy(BaselinePolicy):
    """A uniformly random action (uniform over the allowed ones when masks are given).

    ``deterministic`` has no effect: the baseline is random by definition; ``seed`` makes
    its sequence of actions reproducible.
    """

    name = "uniform_random"

    def __init__(self, env: gym.Env, seed: int | None = None) -> None:
        super().__init__(env)
        self.rng = np.random.default_rng(seed)

    def choose(self, observation: np.ndarray) -> int:
        return int(self.rng.integers(self.n_actions))

    def act(self, observation: np.ndarray, mask: np.ndarray | None) -> int:
        if mask is None:
            return self.choose(observation)
        return int(self.rng.choice(_allowed(mask)))


class EnergyThresholdPolicy(BaselinePolicy):
    """The smallest candidate rank retaining at least ``tau`` of the spectral energy.

    Reads the observation's ``energy`` slice (energy retained at each candidate rank);
    full rank retains all of it, so the rule always has an answer.

    Raises:
        ValueError: ``tau`` is not in (0, 1].
    """

    def __init__(self, env: gym.Env, tau: float = 0.9) -> None:
        super().__init__(env)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau={tau!r} must be in (0, 1]")
        self.tau = float(tau)
        self.name = f"energy_threshold_{self.tau:g}"

    def choose(self, observation: np.ndarray) -> int:
        return energy_threshold_action(observation[self.layout.slices["energy"]], self.tau)


class GreedyOraclePolicy(BaselinePolicy):
    """The action of best immediate reward (cached backend lookups): an upper reference.

    It reads the env it was built with, not the observation: use it only on that env, one
    observation at a time, in step with the episode. It picks among the allowed actions (a
    masked action is worth exactly the rank the guardrail replaces it with), so it never
    requests a masked one. Being one-step greedy, it is no bound on the episode return: the
    perturbation term can make the myopic choice keep a layer at a high rank.
    """

    name = "greedy_oracle"

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if not env.unwrapped.teacher_forced:
            raise ValueError("the greedy oracle needs an env with backend='cached'")
        self.env = env.unwrapped

    def choose(self, observation: np.ndarray) -> int:
        return self.act(observation, None)

    def act(self, observation: np.ndarray, mask: np.ndarray | None) -> int:
        """The best allowed action: a masked action only ties with the rank replacing it."""
        allowed = self.env.action_masks() if mask is None else mask & self.env.action_masks()
        return int(np.argmax(np.where(allowed, self.env.candidate_rewards(), -np.inf)))

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Any]:
        """As :meth:`BaselinePolicy.predict`, for a single observation of its own env."""
        if np.asarray(observation).ndim > 1 and len(observation) > 1:
            raise ValueError("the greedy oracle acts on its own env: one observation at a time")
        return super().predict(observation, state, episode_start, deterministic, action_masks)


class SchedulePolicy(BaselinePolicy):
    """Plays a fixed action schedule per window, e.g. one found on another backend.

    It reads the window and the step of the env it was built with, so, like the greedy
    oracle, it acts on that env only, one observation at a time.

    Args:
        env: The env it acts in.
        schedules: Window index -> (segments, layers) action indices of the env's grid.
        name: The leaderboard name.

    Raises:
        ValueError: A schedule has the wrong shape or an action outside the grid.
    """

    def __init__(self, env: gym.Env, schedules: dict[int, np.ndarray], name: str) -> None:
        super().__init__(env)
        self.env = env.unwrapped
        shape = (self.env.n_segments, self.env.n_layers)
        self.actions: dict[int, np.ndarray] = {}
        for window, actions in schedules.items():
            table = np.asarray(actions)
            if (
                table.shape != shape
                or not np.issubdtype(table.dtype, np.integer)
                or not ((table >= 0) & (table < self.n_actions)).all()
            ):
                raise ValueError(
                    f"schedule of window {window} must be a {shape} table of action indices "
                    f"in 0..{self.n_actions - 1}"
                )
            self.actions[int(window)] = table.flatten()
        self.name = name

    def choose(self, observation: np.ndarray) -> int:
        if self.env.window not in self.actions:
            raise ValueError(f"no schedule for window {self.env.window}")
        return int(self.actions[self.env.window][self.env.step_index])


def make_baseline(name: str, env: gym.Env, **kwargs: Any) -> BaselinePolicy:
    """Build the registered baseline ``name`` for ``env`` (see
    :func:`agents.baseline_registry.make_baseline`: the one registry of baselines)."""
    from agents.baseline_registry import make_baseline as build

    return build(name, env, **kwargs)


def standard_baselines(
    env: gym.Env, taus: tuple[float, ...] = (0.9, 0.99), seed: int = 0
) -> dict[str, BaselinePolicy]:
    """Full rank, every static rank, uniform random, energy thresholds and (cached) the oracle."""
    policies: list[BaselinePolicy] = [FullRankPolicy(env)]
    grid = env.unwrapped.actions
    policies += [StaticRankPolicy(env, s.rank, s.keep) for s in grid.settings[:-1]]
    policies.append(UniformRandomPolicy(env, seed=seed))
    policies += [EnergyThresholdPolicy(env, tau) for tau in taus]
    if env.unwrapped.teacher_forced:
        policies.append(GreedyOraclePolicy(env))
    return {policy.name: policy for policy in policies}


def dynamic_rank_env(env: gym.Env) -> gym.Env:
    """``env.unwrapped``, checked to have a rank grid and an observation layout."""
    base = env.unwrapped
    if not hasattr(base, "ranks") or not hasattr(base, "layout"):
        raise ValueError(f"the baselines need a dynamic-rank env, got {base}")
    return base


def energy_threshold_action(energies: np.ndarray, tau: float) -> int:
    """Index of the first candidate rank whose retained energy is ``>= tau`` (last if none)."""
    reached = np.flatnonzero(np.asarray(energies) >= tau)
    return int(reached[0]) if reached.size else len(energies) - 1


def unmasked(action: int, mask: np.ndarray | None) -> int:
    """``action``, or the smallest allowed action above it (the env's guardrail rule)."""
    if mask is None or mask[action]:
        return int(action)
    allowed = _allowed(mask)
    above = allowed[allowed > action]
    return int(above[0]) if above.size else int(allowed[-1])


def _allowed(mask: np.ndarray) -> np.ndarray:
    allowed = np.flatnonzero(mask)
    if not allowed.size:
        raise ValueError("action_masks allows no action")
    return allowed


def _batch_masks(action_masks: np.ndarray | None, n: int, n_actions: int) -> np.ndarray | None:
    if action_masks is None:
        return None
    masks = np.asarray(action_masks, dtype=bool)
    if masks.size != n * n_actions:
        raise ValueError(
            f"action_masks of shape {masks.shape} does not fit {n} observation(s) and "
            f"{n_actions} actions"
        )
    return masks.reshape(n, n_actions)

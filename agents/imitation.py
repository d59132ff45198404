"""Imitation of the per-window optimum: behaviour cloning and DAgger on cached windows.

On a budgeted cached env every action's fidelity and realised FLOPs at every cell are stored
lookups, so the best schedule of a window under the budget is an exact knapsack over its
cells (:func:`agents.budget_baselines.knapsack_table`). That optimum sees the window it is
scored on; a policy that imitates it from observations learns what of it the observations
predict. :class:`Expert` answers the optimal action at any state (window, step, FLOPs spent):
the knapsack's table holds the optimum of the remaining cells for every budget left, so a
state the learner reached on its own has an answer too (what DAgger needs).

- :class:`BehaviourCloning` (``make_agent("bc", env)``): plays the expert on train windows
  and fits the policy network to its actions (cross-entropy, masked like MaskablePPO).
- :class:`DAgger` (``make_agent("dagger", env)``): rounds of playing the current policy
  (mixed with the expert at a rate that halves each round), labelling every visited state
  with the expert's action, and fitting on everything gathered so far (Ross et al., 2011).

Both are :class:`~sb3_contrib.MaskablePPO` models whose ``learn`` imitates instead of
running PPO: they save, load and predict as MaskablePPO does, and a later
``MaskablePPO.learn(model, ...)`` fine-tunes them with PPO. The ``imitation`` library is
not used: its releases pin gymnasium 0.29 and stable-baselines3 2.2, older than ours.

The expert plans with realised costs; the env's budget wall plans with each action's upper
bound (``topp``), so an expert action the wall refuses is labelled as the action the wall
puts in its place (what would run).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from sb3_contrib import MaskablePPO
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.budget_baselines import COST_BINS, fidelity_values, knapsack_table, realised_costs
from drrl_env.envs.dynamic_rank import DynamicRankEnv


class Expert:
    """The per-window optimum of a budgeted, cached env, answerable at any state.

    Args:
        env: A budgeted dynamic-rank env on the cached backend (wrappers allowed).
        bins: Cost resolution of the knapsack (units of ``cap / bins``).

    Raises:
        ValueError: The env has no budget or is not teacher forced (cached).
    """

    def __init__(self, env: gym.Env, bins: int = COST_BINS) -> None:
        base = env.unwrapped
        if not isinstance(base, DynamicRankEnv):
            raise ValueError(f"the expert needs a dynamic-rank env, got {type(base).__name__}")
        if base.wall is None:
            raise ValueError("the expert plans under a budget: gym.make(..., budget=b)")
        if not base.teacher_forced:
            raise ValueError(
                "the expert reads every action's cached measurements: build the env with "
                "backend='cached'"
            )
        self.env, self.bins = base, bins
        self.values = fidelity_values(base)  # (W, S, L, A)
        self.costs = realised_costs(base)
        self.cap = base.wall.cap
        self.unit = self.cap / bins
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _table(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        if window not in self._tables:
            actions = self.values.shape[-1]
            self._tables[window] = knapsack_table(
                self.values[window].reshape(-1, actions),
                self.costs[window].reshape(-1, actions),
                self.cap,
                self.bins,
            )
        return self._tables[window]

    def action(self, window: int, step: int, spent: float) -> int:
        """The optimal action at ``step`` of ``window`` with ``spent`` FLOPs already spent."""
        picks, _ = self._table(window)
        left = int(np.clip(np.floor((self.cap - spent) / self.unit + 1e-9), 0, self.bins))
        return int(picks[step, left])

    def schedule(self, window: int) -> np.ndarray:
        """(S, L) the expert's schedule of ``window`` when it acts from the start.

        It asks :meth:`action` at each cell with the FLOPs the cells before it realised.
        Rounding every cost up to whole units leaves slack that an answer from the realised
        spend can use, so the schedule is feasible and worth at least the knapsack's plan.
        """
        costs = self.costs[window].reshape(-1, self.costs.shape[-1])
        chosen, spent = np.zeros(len(costs), dtype=np.int64), 0.0
        for step in range(len(costs)):
            chosen[step] = self.action(window, step, spent)
            spent += costs[step, chosen[step]]
        return chosen.reshape(self.values.shape[1:3])

    def label(self) -> int:
        """The expert's action at the running episode's current state, as it would run (an
        action the wall refuses becomes the wall's replacement)."""
        env = self.env
        action = self.action(env.window, env.step_index, env._spent)
        mask = env.action_masks()
        return action if mask[action] else env.wall.replacement(env.step_index, mask)


class _Imitation(MaskablePPO):
    """A MaskablePPO whose ``learn`` fits the policy to an :class:`Expert` (see the module)."""

    rounds_default = 1

    def __init__(
        self,
        policy: Any,
        env: Any,
        *,
        imitation_epochs: int = 20,
        imitation_batch_size: int = 256,
        imitation_learning_rate: float = 1e-3,
        rounds: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("imitation_epochs", imitation_epochs),
            ("imitation_batch_size", imitation_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        rounds = self.rounds_default if rounds is None else rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
        if not imitation_learning_rate > 0:
            raise ValueError(f"imitation_learning_rate must be > 0, got {imitation_learning_rate}")
        super().__init__(policy, env, **kwargs)
        self.imitation_epochs = imitation_epochs
        self.imitation_batch_size = imitation_batch_size
        self.imitation_learning_rate = imitation_learning_rate
        self.rounds = rounds
        self.imitation_history: list[dict[str, float]] = []

    # -- the env the expert answers in --------------------------------------------------------

    def _demo_env(self) -> gym.Env:
        env = self.get_env()
        if not isinstance(env, DummyVecEnv) or env.num_envs != 1:
            raise ValueError(
                f"{type(self).__name__} plays one cached env in this process: pass a gym env "
                "(or a DummyVecEnv of one)"
            )
        return env.envs[0]

    def _mixture(self, round_index: int) -> float:
        """Probability that the expert, not the policy, acts in round ``round_index``."""
        raise NotImplementedError

    # -- learning ---------------------------------------------------------------------------

    def learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1,
        tb_log_name: str = "imitation",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
        **_: Any,
    ):
        """Gather ``total_timesteps`` expert-labelled steps in ``rounds`` rounds, fitting the
        policy after each; callbacks see every env step as in PPO. Episodes are played whole,
        so a round may gather more than its share, and the last rounds then have none left
        (they are skipped: a fit without new data would only train longer)."""
        if isinstance(total_timesteps, bool) or not isinstance(total_timesteps, int):
            raise ValueError(f"total_timesteps must be an int, got {total_timesteps!r}")
        env = self._demo_env()
        expert = Expert(env)
        total_timesteps, callback = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        callback.on_training_start(locals(), globals())
        base = env.unwrapped
        steps = base.steps
        per_round = -(-(total_timesteps - self.num_timesteps) // self.rounds)
        observations: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        labels: list[int] = []
        rng = np.random.default_rng(self.seed)
        order: list[int] = []  # every train window once per pass, in a seeded order
        for round_index in range(self.rounds):
            if self.num_timesteps >= total_timesteps:
                break  # whole episodes overran the earlier rounds' shares: nothing new to fit
            expert_rate = self._mixture(round_index)
            callback.on_rollout_start()
            gathered = 0
            while gathered < per_round and self.num_timesteps < total_timesteps:
                if not order:
                    order = rng.permutation(base.n_windows).tolist()
                window = int(order.pop())
                observation, _ = env.reset(options={"window": window})
                for _ in range(steps):
                    mask = base.action_masks()
                    label = expert.label()
                    observations.append(observation)
                    masks.append(mask)
                    labels.append(label)
                    if rng.random() < expert_rate:
                        action = label
                    else:
                        action, _ = self.predict(observation, deterministic=True, action_masks=mask)
                    observation, reward, terminated, truncated, info = env.step(int(action))
                    self.num_timesteps += 1
                    gathered += 1
                    callback.update_locals(locals())
                    if not callback.on_step():
                        return self
                    if terminated or truncated:
                        break
            callback.on_rollout_end()
            metrics = self._fit(np.asarray(observations), np.asarray(masks), np.asarray(labels))
            metrics.update(round=round_index, expert_rate=expert_rate, samples=len(labels))
            self.imitation_history.append(metrics)
            for key, value in metrics.items():
                self.logger.record(f"imitation/{key}", value)
            self.logger.dump(self.num_timesteps)
        callback.on_training_end()
        return self

    def _fit(self, observations: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict:
        """Epochs of masked cross-entropy of the policy's action distribution on the labels."""
        policy = self.policy
        policy.set_training_mode(True)
        optimizer = th.optim.Adam(policy.parameters(), lr=self.imitation_learning_rate)
        obs = th.as_tensor(observations, dtype=th.float32, device=self.device)
        mask = th.as_tensor(masks, dtype=th.bool, device=self.device)
        target = th.as_tensor(labels, dtype=th.int64, device=self.device)
        generator = th.Generator().manual_seed(int(self.seed or 0) + len(labels))
        for _ in range(self.imitation_epochs):
            order = th.randperm(len(target), generator=generator)
            for start in range(0, len(target), self.imitation_batch_size):
                batch = order[start : start + self.imitation_batch_size]
                distribution = policy.get_distribution(obs[batch], action_masks=mask[batch])
                loss = -distribution.log_prob(target[batch]).mean()
                optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(policy.parameters(), self.max_grad_norm)
                optimizer.step()
        policy.set_training_mode(False)
        with th.no_grad():
            distribution = policy.get_distribution(obs, action_masks=mask)
            loss = float(-distribution.log_prob(target).mean())
            chosen = distribution.get_actions(deterministic=True)
            accuracy = float((chosen == target).float().mean())
        return {"loss": loss, "accuracy": accuracy}


class BehaviourCloning(_Imitation):
    """Behaviour cloning of the per-window optimum: the expert acts in every episode."""

    rounds_default = 1

    def _mixture(self, round_index: int) -> float:
        return 1.0


class DAgger(_Imitation):
    """DAgger: the expert acts in round 0, then with probability ``0.5 ** round``."""

    rounds_default = 4

    def _mixture(self, round_index: int) -> float:
        return 0.5**round_index

"""Lagrangian (primal-dual) PPO: the FLOPs budget as a constraint priced by a multiplier.

On a soft budget (``gym.make(id, enforce_budget=False)``: the observation shows the budget
left, but no action is masked and an episode may overspend) the budget is a constraint on
the expected episode cost, where a step's cost is its executed attention FLOPs over the
exact attention FLOPs of the whole episode::

    cost_t = info["flops"] / env.unwrapped.episode_full_flops
    maximise E[return]  subject to  E[sum_t cost_t] <= b = env.unwrapped.config.budget

An episode's summed cost is its ``episode_summary["flops_ratio"]``, the budget's unit.
:class:`LagrangianPPO` (``make_agent("lagrangian_ppo", env)``) trains MaskablePPO on the
penalised reward ``r_t - lam * cost_t`` and, after every rollout, takes one projected
dual-ascent step on the multiplier (Tessler et al., 2019, "Reward Constrained Policy
Optimization"; Ray et al., 2019, PPO-Lagrangian)::

    lam <- max(0, lam + lambda_learning_rate * (mean episode cost - b))

over the episodes that finished in that rollout (no step when none did). While the policy
overspends the price of FLOPs rises; once it underspends the price falls, down to 0 when
the budget does not bind. Train it on the soft budget, deploy it under the wall: the
observation is the same, so ``load_agent(path, env=gym.make(id))`` accepts it, and the
wall catches the overspending that a price meets only on average.

How the pieces hook into MaskablePPO:

- :class:`LagrangianPenalty`, a ``VecEnvWrapper``, subtracts ``lam * cost_t`` from each
  reward in ``step_wait``, reading ``lam`` from the model at every step, and records the
  cost of every finished episode. ``info["unpenalised_reward"]`` keeps the env's reward and
  ``info["cost"]`` the step's cost. The ``Monitor`` that SB3 puts around each env sits
  inside the wrapper, so ``rollout/ep_rew_mean`` is the env's own return.
- ``_setup_learn`` wraps the training env (once; a fresh wrapper forces a reset, so no
  episode is costed from its middle). Only training is wrapped and checked: constructing
  or loading the model on an env under the wall, to deploy it, stays possible.
- ``collect_rollouts`` is overridden for the dual step: a rollout is exactly the unit of
  the update, the method is handed the env it collects from (so the step reads that env's
  budget and the costs its penalty recorded), and it returns before ``learn`` dumps the
  logs, so ``lagrangian/lambda``, ``lagrangian/episode_cost`` and
  ``lagrangian/constraint_violation`` land in the rollout's own log row. A callback would
  have to be merged into the user's callbacks in ``_setup_learn`` to see the same moment
  (``on_rollout_end``), and overriding ``learn`` would fork MaskablePPO's loop.

The rewards of a rollout are penalised with the ``lam`` in effect while it was collected;
the step taken after it prices the next rollout. ``lam`` lives in
``model.lagrange_multiplier``, a plain float, so SB3's ``save`` / ``load`` round-trips it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from drrl_env.rewards import check_weight

TRAIN_ON_SOFT_BUDGET = (
    "train lagrangian_ppo on gym.make(id, enforce_budget=False); deploy it under the wall"
)


def soft_budget(env: gym.Env | VecEnv) -> float:
    """The budget ``b`` of an env with a soft budget (every copy of a VecEnv).

    Raises:
        ValueError: The env has no budget, enforces it (the wall), or its copies have
            different budgets.
    """
    budgets = {_soft_budget_of(config) for config in _configs(env)}
    if len(budgets) > 1:
        raise ValueError(f"the env's copies have different budgets {sorted(budgets)}")
    return budgets.pop()


def _configs(env: gym.Env | VecEnv) -> list[Any]:
    if isinstance(env, VecEnv):
        return env.get_attr("config") if env.has_attr("config") else [None]
    try:
        return [env.get_wrapper_attr("config")]
    except AttributeError:
        return [None]


def _soft_budget_of(config: Any) -> float:
    budget = getattr(config, "budget", None)
    if budget is None:
        raise ValueError(
            "lagrangian_ppo prices a FLOPs budget but the env has none: pass a budgeted "
            f"dynamic-rank env (budget=b); {TRAIN_ON_SOFT_BUDGET}"
        )
    if getattr(config, "enforce_budget", True):
        raise ValueError(
            "lagrangian_ppo learns to meet the budget itself, but this env enforces it (the "
            f"wall masks every action that would overspend, leaving nothing to price); "
            f"{TRAIN_ON_SOFT_BUDGET}"
        )
    return float(budget)


class LagrangianPenalty(VecEnvWrapper):
    """Subtracts ``multiplier() * cost_t`` from every reward of a soft-budget VecEnv.

    ``cost_t = info["flops"] / episode_full_flops`` of the copy that stepped; the step's
    ``info`` gains ``unpenalised_reward`` (the env's reward) and ``cost``, and the
    penalised rewards come back as float64. The summed cost of every episode that ends is
    appended to :attr:`finished_costs`.

    Args:
        venv: A VecEnv of dynamic-rank envs with a soft budget (``enforce_budget=False``).
        multiplier: Returns the current ``lam`` (read at every step).

    Raises:
        ValueError: ``venv`` has no soft budget (see :func:`soft_budget`).
    """

    def __init__(self, venv: VecEnv, multiplier: Callable[[], float]) -> None:
        budget = soft_budget(venv)
        super().__init__(venv)
        self.budget = budget
        self.multiplier = multiplier
        self.episode_full_flops = np.asarray(
            venv.get_attr("episode_full_flops"), dtype=np.float64
        )  # (N,)
        self.running_costs = np.zeros(self.num_envs)  # (N,) cost of each running episode
        self.finished_costs: list[float] = []

    def reset(self) -> VecEnvObs:
        self.running_costs[:] = 0.0
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        observations, rewards, dones, infos = self.venv.step_wait()
        costs = np.array([info["flops"] for info in infos]) / self.episode_full_flops  # (N,)
        penalised = np.asarray(rewards, dtype=np.float64) - float(self.multiplier()) * costs
        self.running_costs += costs
        for info, reward, cost in zip(infos, rewards, costs, strict=True):
            info["unpenalised_reward"] = float(reward)
            info["cost"] = float(cost)
        for index in np.flatnonzero(dones):
            self.finished_costs.append(float(self.running_costs[index]))
            self.running_costs[index] = 0.0
        return observations, penalised, dones, infos

    def pop_finished_costs(self) -> list[float]:
        """The costs of the episodes finished since the last call, then forgets them."""
        costs, self.finished_costs = self.finished_costs, []
        return costs


class LagrangianPPO(MaskablePPO):
    """MaskablePPO on ``reward - lam * cost``, with ``lam`` updated by projected dual ascent.

    Args:
        policy: The policy (as for MaskablePPO).
        env: A soft-budget env to train on (``gym.make(id, enforce_budget=False)``);
            checked when ``learn`` starts, so the model can be built or loaded on an env
            under the wall to be deployed.
        lambda_init: Initial multiplier ``lam`` (>= 0).
        lambda_learning_rate: Step size of the dual ascent (>= 0; 0 keeps the price fixed).
        **kwargs: MaskablePPO's other arguments.

    Raises:
        ValueError: ``lambda_init`` or ``lambda_learning_rate`` negative or not finite.
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        *,
        lambda_init: float = 0.0,
        lambda_learning_rate: float = 0.1,
        **kwargs: Any,
    ) -> None:
        check_weight("lambda_init", lambda_init)  # a finite number >= 0, else ValueError
        check_weight("lambda_learning_rate", lambda_learning_rate)
        super().__init__(policy, env, **kwargs)
        self.lambda_init = float(lambda_init)
        self.lambda_learning_rate = float(lambda_learning_rate)
        self.lagrange_multiplier = float(lambda_init)

    def learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1,
        tb_log_name: str = "LagrangianPPO",
        reset_num_timesteps: bool = True,
        use_masking: bool = True,
        progress_bar: bool = False,
    ):
        """MaskablePPO's ``learn`` on the penalised reward (see the module)."""
        return super().learn(
            total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            use_masking=use_masking,
            progress_bar=progress_bar,
        )

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        if self.env is None:
            raise ValueError(f"{type(self).__name__} has no env to learn in: set_env(env) first")
        if not isinstance(self.env, LagrangianPenalty):
            self.env = LagrangianPenalty(self.env, lambda: self.lagrange_multiplier)
            self._last_obs = None  # a fresh penalty costs whole episodes only: reset
        return super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
        use_masking: bool = True,
    ) -> bool:
        """MaskablePPO's rollout on the penalised env, then one dual step (see the module)."""
        if not isinstance(env, LagrangianPenalty):
            raise TypeError(
                f"{type(self).__name__} collects from the env learn() wraps in a "
                f"LagrangianPenalty, got {type(env).__name__}"
            )
        continue_training = super().collect_rollouts(
            env, callback, rollout_buffer, n_rollout_steps, use_masking
        )
        mean_cost = self.update_multiplier(env.pop_finished_costs(), env.budget)
        if mean_cost is not None:
            self.logger.record("lagrangian/episode_cost", mean_cost)
            self.logger.record("lagrangian/constraint_violation", mean_cost - env.budget)
        self.logger.record("lagrangian/lambda", self.lagrange_multiplier)
        return continue_training

    def update_multiplier(self, episode_costs: Sequence[float], budget: float) -> float | None:
        """One projected dual-ascent step: ``lam <- max(0, lam + lr * (mean cost - b))``.

        Args:
            episode_costs: Summed costs of the episodes finished in the rollout.
            budget: The budget ``b``, in the same unit.

        Returns:
            The mean episode cost, or None when no episode finished (``lam`` unchanged).
        """
        if len(episode_costs) == 0:
            return None
        mean_cost = float(np.mean(episode_costs))
        step = self.lambda_learning_rate * (mean_cost - budget)
        self.lagrange_multiplier = max(0.0, self.lagrange_multiplier + step)
        return mean_cost

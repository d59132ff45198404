"""Training callbacks: the env's rank metrics in TensorBoard, checkpoints, early stopping.

:class:`RankMetricsCallback` reads the per-step ``info`` of the dynamic-rank env and logs,
averaged over each rollout (and over the rollouts between two logger dumps):

- ``env/fidelity``, ``env/flops_ratio``, ``env/perturbation``: per-step means;
- ``env/masked_rate``: fraction of steps whose requested action the guardrail replaced;
- ``env/rank_layer_{i}``: mean executed rank of layer ``i``;

and, at each episode end, ``env/episode_mean_fidelity``, ``env/episode_flops_reduction``,
``env/episode_mean_rank``, ``env/episode_masked_actions`` (and on the live backend
``env/episode_perplexity``). Checkpointing and early stopping are SB3's own callbacks,
assembled by :func:`checkpoint_callback`, :func:`early_stopping_callback` and
:func:`training_callbacks`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnNoModelImprovement,
)
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv

PREFIX = "env"
MASKABLE_ALGOS = ("maskable_ppo", "bc", "dagger", "lagrangian_ppo")
"""Algorithms whose models take action masks (sb3-contrib MaskablePPO and its imitators)."""
STEP_KEYS = ("fidelity", "flops_ratio", "perturbation")
EPISODE_KEYS = {
    "mean_fidelity": "episode_mean_fidelity",
    "flops_reduction": "episode_flops_reduction",
    "mean_rank": "episode_mean_rank",
    "masked_actions": "episode_masked_actions",
    "perplexity": "episode_perplexity",
}


class RankMetricsCallback(BaseCallback):
    """Log the env's fidelity, FLOPs, perturbation, ranks and masking to the SB3 logger.

    Attributes:
        history: The metrics of every finished rollout (a dict each), oldest first.
        episodes: The ``episode_summary`` of every finished episode, oldest first.
    """

    def __init__(self, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.history: list[dict[str, float]] = []
        self.episodes: list[dict[str, Any]] = []
        self._steps: dict[str, list[float]] = defaultdict(list)

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            if "fidelity" in info:
                self._add_step(info)
            if "episode_summary" in info:
                self._add_episode(info["episode_summary"])
        return True

    def _on_rollout_end(self) -> None:
        metrics = self.rollout_metrics()
        for key, value in metrics.items():
            self.logger.record_mean(key, value)
        if metrics:
            self.history.append(metrics)
        self._steps = defaultdict(list)

    def rollout_metrics(self) -> dict[str, float]:
        """Means of the steps seen since the last rollout end, by logger key."""
        return {key: float(np.mean(values)) for key, values in sorted(self._steps.items())}

    def _add_step(self, info: dict[str, Any]) -> None:
        for key in STEP_KEYS:
            self._steps[f"{PREFIX}/{key}"].append(float(info[key]))
        self._steps[f"{PREFIX}/masked_rate"].append(float(info["action_masked"]))
        self._steps[f"{PREFIX}/rank_layer_{info['layer']}"].append(float(info["rank"]))

    def _add_episode(self, summary: dict[str, Any]) -> None:
        self.episodes.append(summary)
        for key, name in EPISODE_KEYS.items():
            if summary.get(key) is not None:
                self.logger.record_mean(f"{PREFIX}/{name}", float(summary[key]))


def checkpoint_callback(
    save_dir: str | Path, save_freq: int, name_prefix: str = "agent"
) -> CheckpointCallback:
    """SB3's ``CheckpointCallback``: save the model every ``save_freq`` env steps (per env)."""
    return CheckpointCallback(save_freq=save_freq, save_path=str(save_dir), name_prefix=name_prefix)


def early_stopping_callback(
    eval_env: gym.Env | VecEnv,
    algo: str,
    save_dir: str | Path,
    eval_freq: int,
    n_eval_episodes: int = 4,
    patience: int = 5,
    min_evals: int = 2,
) -> EvalCallback:
    """An ``EvalCallback`` (``MaskableEvalCallback`` for maskable_ppo) stopping training early.

    Evaluates every ``eval_freq`` env steps (per env) on ``eval_env``, keeps the best model
    in ``save_dir/best_model.zip`` and stops, via ``StopTrainingOnNoModelImprovement``, after
    ``patience`` evaluations without a better mean return (once ``min_evals`` have run).
    """
    if not isinstance(eval_env, VecEnv) and not _is_monitored(eval_env):
        eval_env = Monitor(eval_env)
    stop = StopTrainingOnNoModelImprovement(max_no_improvement_evals=patience, min_evals=min_evals)
    eval_class = MaskableEvalCallback if algo in MASKABLE_ALGOS else EvalCallback
    return eval_class(
        eval_env,
        callback_after_eval=stop,
        n_eval_episodes=n_eval_episodes,
        eval_freq=eval_freq,
        log_path=str(save_dir),
        best_model_save_path=str(save_dir),
        deterministic=True,
    )


def training_callbacks(
    algo: str,
    save_dir: str | Path,
    eval_env: gym.Env | VecEnv | None = None,
    checkpoint_freq: int = 10_000,
    eval_freq: int = 2_000,
    patience: int = 5,
) -> CallbackList:
    """Rank metrics, checkpoints in ``save_dir`` and, given ``eval_env``, early stopping."""
    callbacks: list[BaseCallback] = [
        RankMetricsCallback(),
        checkpoint_callback(Path(save_dir) / "checkpoints", checkpoint_freq, algo),
    ]
    if eval_env is not None:
        callbacks.append(
            early_stopping_callback(eval_env, algo, save_dir, eval_freq, patience=patience)
        )
    return CallbackList(callbacks)


def _is_monitored(env: gym.Env) -> bool:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, Monitor):
            return True
        env = env.env
    return False

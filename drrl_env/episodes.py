"""The episode loop: every script, baseline, replay and notebook plays episodes through it.

:func:`play_episode` resets ``env`` to a window and steps it to the end with the actions of
a chooser: a function ``choose(observation, env) -> action`` (what an agent or a baseline
does, e.g. :func:`agents.evaluation.actor`), or an (S, L) table of actions played as given
(a replay). It returns a :class:`Trace`: the per-step rewards and requested actions, the
episode summary, and on request every step's ``info`` and action mask.

    from drrl_env.episodes import play_episode

    trace = play_episode(env, lambda observation, env: 0, window=3)
    trace.actions, trace.rewards, trace.summary["flops_ratio"]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

Chooser = Callable[[np.ndarray, gym.Env], int]


@dataclass(frozen=True)
class Trace:
    """One played episode.

    Attributes:
        window: The window played.
        rewards: (steps,) reward of every step.
        requested: (steps,) the action asked for at every step (before the env's mask).
        summary: ``info["episode_summary"]`` of the last step.
        steps: With ``record_steps``: every step's ``info`` (its summary left out), with the
            action mask before the step under ``"mask"``; else None.
    """

    window: int
    rewards: np.ndarray
    requested: np.ndarray
    summary: dict[str, Any]
    steps: list[dict[str, Any]] | None = None

    @property
    def actions(self) -> np.ndarray:
        """(S, L) the executed actions."""
        return np.asarray(self.summary["actions"])


def table_chooser(env: gym.Env, actions) -> Chooser:
    """A chooser replaying the (S, L) table ``actions`` (checked against ``env``'s shape)."""
    base = env.unwrapped
    table = np.asarray(actions)
    expected = (base.n_segments, base.n_layers)
    if table.shape != expected:
        raise ValueError(
            f"actions has shape {table.shape}, expected (segments, layers) = {expected}"
        )
    if (
        not np.issubdtype(table.dtype, np.integer)
        or not ((table >= 0) & (table < len(base.actions))).all()
    ):
        raise ValueError(f"actions must be integers in 0..{len(base.actions) - 1}")
    flat = table.reshape(-1)
    return lambda observation, env: int(flat[env.unwrapped.step_index])


def play_episode(
    env: gym.Env,
    choose: Chooser | np.ndarray,
    window: int,
    *,
    record_steps: bool = False,
) -> Trace:
    """Play ``window`` of ``env`` to its end with ``choose``; see the module docstring.

    Args:
        env: A dynamic-rank env (wrappers allowed).
        choose: ``choose(observation, env) -> action``, or an (S, L) action table.
        window: The window (``reset(options={"window": window})``).
        record_steps: Keep every step's ``info`` and action mask in ``Trace.steps``.

    Raises:
        ValueError: A table of the wrong shape or with actions outside the grid.
        RuntimeError: The episode was cut before its last step (no episode summary).
    """
    if not callable(choose):
        choose = table_chooser(env, choose)  # a bad table fails before the reset
    observation, _ = env.reset(options={"window": int(window)})
    return continue_episode(env, choose, observation, record_steps=record_steps)


def continue_episode(
    env: gym.Env,
    choose: Chooser | np.ndarray,
    observation: np.ndarray,
    *,
    record_steps: bool = False,
) -> Trace:
    """Step ``env``, just reset (``observation`` is what ``reset`` returned), to the end of
    its episode with ``choose``: :func:`play_episode` without the reset, for a caller that
    needs the first observation before it chooses (the one-shot env)."""
    if env.unwrapped.step_index != 0:
        raise RuntimeError("continue_episode needs an env just reset (at step 0)")
    if not callable(choose):
        choose = table_chooser(env, choose)
    window = env.unwrapped.window
    rewards: list[float] = []
    requested: list[int] = []
    steps: list[dict[str, Any]] | None = [] if record_steps else None
    info: dict[str, Any] = {}
    done = False
    while not done:
        mask = env.unwrapped.action_masks() if record_steps else None
        observation, reward, terminated, truncated, info = env.step(choose(observation, env))
        rewards.append(float(reward))
        requested.append(int(info["requested_action"]))
        if steps is not None:
            step = {k: v for k, v in info.items() if k != "episode_summary"}
            steps.append({**step, "mask": mask})
        done = terminated or truncated
    if "episode_summary" not in info:
        raise RuntimeError(f"window {window}: the episode was cut before its last step")
    return Trace(
        int(window), np.asarray(rewards), np.asarray(requested), info["episode_summary"], steps
    )

"""``OneShotEnv``: one action per window sets every (segment, layer) cell at once.

The sequential env asks for a setting before each layer runs on each segment. Here the
agent sees the window's first observation (what is computed up to the first layer of the
first segment: its spectrum, input statistics, the layer's weight statistics and, budgeted,
the budget) and answers with one ``MultiDiscrete`` action holding the setting of every cell,
segment-major and layer-minor as the sequential env steps them. The episode is that one
step: the cells are played in order through the sequential env, whose budget wall clips an
action that would break the budget (the AMC rule: the most expensive allowed action
replaces it), and the reward is the sequential episode's return.

It is a contextual bandit. A constant action is a static allocation, so the best
deployable policy is at least as good as the best static one, and anything better is
adaptivity to the input.

    import gymnasium as gym
    import drrl_env

    env = gym.make("DRRL-Mix-TopP-OneShot-v0")
    observation, info = env.reset(seed=0)
    observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["episode_summary"]["flops_ratio"]
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from drrl_env.envs.config import EnvConfig
from drrl_env.envs.dynamic_rank import RESET_OPTIONS, DynamicRankEnv
from drrl_env.episodes import continue_episode


class OneShotEnv(gym.Env):
    """Every cell's setting in one action (see the module docstring).

    Takes the keywords of :class:`~drrl_env.envs.dynamic_rank.DynamicRankEnv` (or its
    ``config``); ``env.unwrapped.sequential`` is the sequential env the cells are played in.

    ## Action Space

    ``MultiDiscrete([A] * (S * L))``: entry ``s * L + l`` is the action index (into the
    sequential env's grid, ``env.unwrapped.actions``) of layer ``l`` at segment ``s``.

    ## Observation Space

    The sequential env's observation space; the observation is its first one.

    ## Rewards

    The sequential episode's return (the sum of its step rewards, with whatever reward
    options the configuration sets). ``info`` holds ``episode_summary`` (executed actions,
    FLOPs, and on the live backend the quality against exact attention),
    ``step_rewards`` and ``requested`` (S, L), the actions asked for.

    ## Episode End

    After the one step (terminated).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.sequential = DynamicRankEnv(config, **kwargs)
        self.config = self.sequential.config
        self.actions = self.sequential.actions
        self.n_segments, self.n_layers = self.sequential.n_segments, self.sequential.n_layers
        self.action_space = spaces.MultiDiscrete(
            np.full(self.n_segments * self.n_layers, len(self.actions), dtype=np.int64)
        )
        self.observation_space = self.sequential.observation_space
        self._observation: np.ndarray | None = None

    @property
    def n_windows(self) -> int:
        """Windows of the split (``reset(options={"window": i})``)."""
        return self.sequential.n_windows

    @property
    def teacher_forced(self) -> bool:
        """Whether the sequential env's measurements are stored lookups (cached)."""
        return self.sequential.teacher_forced

    def rollout(self, name: str, window: int | None = None) -> np.ndarray:
        """The sequential env's stored teacher-forced array (cached backend)."""
        return self.sequential.rollout(name, window)

    def signature(self) -> dict:
        """The sequential env's signature, marked one-shot (its actions mean other things)."""
        return {**self.sequential.signature(), "one_shot": True}

    def table(self, action) -> np.ndarray:
        """The (S, L) action table of a one-shot ``action``; ValueError if not in the space."""
        flat = np.asarray(action)
        if (
            flat.shape != self.action_space.shape
            or not np.issubdtype(flat.dtype, np.integer)
            or not self.action_space.contains(flat.astype(np.int64))
        ):
            raise ValueError(
                f"action must be {self.n_segments * self.n_layers} integers in "
                f"0..{len(self.actions) - 1} (one per segment x layer cell), got "
                f"shape {flat.shape} dtype {flat.dtype}"
            )
        return flat.astype(np.int64).reshape(self.n_segments, self.n_layers)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"options={options!r} must be a dict (keys: {RESET_OPTIONS})")
        options = dict(options or {})
        if options.get("window") is None:
            options["window"] = int(self.np_random.integers(self.n_windows))
        self._observation, info = self.sequential.reset(options=options)
        return self._observation, info

    def step(self, action):
        if self._observation is None:
            raise RuntimeError("step() called before reset(); every episode is one step")
        table = self.table(action)
        observation, self._observation = self._observation, None
        trace = continue_episode(self.sequential, table, observation)
        info = {
            "window": trace.window,
            "episode_summary": trace.summary,
            "step_rewards": trace.rewards,
            "requested": trace.requested.reshape(self.n_segments, self.n_layers),
        }
        return observation.copy(), float(trace.rewards.sum()), True, False, info

    def close(self) -> None:
        self.sequential.close()

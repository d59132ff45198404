"""Replay: recompute an episode from its window id and rank schedule, and check its numbers.

Every row of a results table names a window and the ranks a policy chose; ``replay``
runs that schedule again on the live backend and ``validate`` checks that the recorded
rewards and perplexity come out the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from drrl_env.envs.config import EnvConfig
from drrl_env.envs.dynamic_rank import DynamicRankEnv


class ReplayMismatch(AssertionError):
    """A recorded number differs from its recomputation."""


@dataclass(frozen=True)
class ReplayResult:
    """What the replayed episode produced."""

    window: int
    ranks: np.ndarray  # (S, L) executed ranks
    rewards: np.ndarray  # (S * L,)
    summary: dict

    @property
    def perplexity(self) -> float | None:
        return self.summary.get("perplexity")


def live_env(config: EnvConfig | None = None, **kwargs) -> DynamicRankEnv:
    """A live-backend environment for ``config`` (or keyword arguments)."""
    config = config if config is not None else EnvConfig(**kwargs)
    return DynamicRankEnv(replace(config, backend="live"))


def replay(env: DynamicRankEnv, window: int, ranks) -> ReplayResult:
    """Run ``ranks`` (S, L) on ``window`` of ``env`` and return what it measured.

    Raises:
        ValueError: ``ranks`` has the wrong shape or holds a rank outside the env's grid.
    """
    schedule = np.asarray(ranks)
    expected = (env.n_segments, env.n_layers)
    if schedule.shape != expected:
        raise ValueError(
            f"ranks has shape {schedule.shape}, expected (segments, layers) = {expected}"
        )
    unknown = sorted(set(schedule.flatten().tolist()) - set(env.ranks))
    if unknown:
        raise ValueError(f"ranks holds {unknown}, not in the environment's grid {env.ranks}")
    index = {rank: i for i, rank in enumerate(env.ranks)}
    env.reset(options={"window": int(window)})
    rewards, info = [], {}
    for rank in schedule.flatten():
        _, reward, _, _, info = env.step(index[int(rank)])
        rewards.append(reward)
    summary = info["episode_summary"]
    return ReplayResult(int(window), np.asarray(summary["ranks"]), np.asarray(rewards), summary)


def validate(
    env: DynamicRankEnv,
    window: int,
    ranks,
    rewards=None,
    perplexity: float | None = None,
    rtol: float = 1e-6,
) -> ReplayResult:
    """Replay and check recorded ``rewards`` (per step) and ``perplexity``.

    Raises:
        ReplayMismatch: A recorded number is not reproduced within ``rtol``.
    """
    result = replay(env, window, ranks)
    if not np.array_equal(result.ranks, np.asarray(ranks)):
        raise ReplayMismatch(f"window {window}: the guardrail changed ranks on replay")
    if rewards is not None and not np.allclose(result.rewards, rewards, rtol=rtol, atol=1e-9):
        worst = int(np.argmax(np.abs(result.rewards - np.asarray(rewards))))
        raise ReplayMismatch(
            f"window {window}: reward of step {worst} replays as {result.rewards[worst]!r}, "
            f"recorded {np.asarray(rewards)[worst]!r}"
        )
    if perplexity is not None:
        if result.perplexity is None:
            raise ReplayMismatch("perplexity needs the live backend")
        if not np.isclose(result.perplexity, perplexity, rtol=rtol):
            raise ReplayMismatch(
                f"window {window}: perplexity replays as {result.perplexity!r}, "
                f"recorded {perplexity!r}"
            )
    return result

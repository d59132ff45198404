"""Replay: recompute an episode from its window id and action schedule, and check its numbers.

Every row of a results table names a window and the actions a policy took; ``replay``
runs that schedule again and ``validate`` checks that the recorded rewards and perplexity
come out the same, within tolerances measured from float32 run-to-run spread
(:data:`REWARD_RTOL`, :data:`PERPLEXITY_RTOL`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from drrl_env.envs.config import EnvConfig
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.episodes import play_episode

REWARD_ATOL = 1e-6
"""Absolute tolerance of a replayed per-step reward.

Cached rewards are lookups of float64 numbers stored once, so they replay bit for bit on
any machine; live rewards come from float32 kernels whose summation order depends on the
thread count and the CPU, which moves a cosine in its 7th digit (see the README's
"Guarantees")."""
REWARD_RTOL = 1e-5
"""Relative tolerance of a replayed per-step reward (see :data:`REWARD_ATOL`)."""
PERPLEXITY_RTOL = 1e-5
"""Relative tolerance of a replayed perplexity: float32 logits summed over a window move
it by a few parts in 10^7 between thread counts; a one-digit edit of a recorded value
changes it by far more."""
EXACT = 1e-12
"""Tolerance of what replays bit for bit: every number of the cached backend (lookups of
stored float64 values) and everything that follows from the actions alone (FLOPs, ranks)."""


def reward_tolerance(bitwise: bool) -> tuple[float, float]:
    """(relative, absolute) tolerance of a replayed reward.

    Args:
        bitwise: Whether the backend replays bit for bit (``env.unwrapped.bitwise_replay``:
            the cached backend's lookups): :data:`EXACT`; else (live) :data:`REWARD_RTOL`
            and :data:`REWARD_ATOL`.

    Raises:
        TypeError: ``bitwise`` is not a bool (e.g. a backend name).
    """
    if not isinstance(bitwise, bool | np.bool_):
        raise TypeError(
            f"reward_tolerance takes whether the backend replays bit for bit "
            f"(env.unwrapped.bitwise_replay), not {bitwise!r}"
        )
    return (EXACT, EXACT) if bitwise else (REWARD_RTOL, REWARD_ATOL)


class ReplayMismatch(AssertionError):
    """A recorded value differs from its recomputation, or a recorded label from what the
    environment or the run it came from says."""


@dataclass(frozen=True)
class ReplayResult:
    """What the replayed episode produced."""

    window: int
    actions: np.ndarray  # (S, L) executed actions
    rewards: np.ndarray  # (S * L,)
    summary: dict

    @property
    def ranks(self) -> np.ndarray:
        """(S, L) executed ranks."""
        return np.asarray(self.summary["ranks"])

    @property
    def perplexity(self) -> float | None:
        return self.summary.get("perplexity")


def live_env(config: EnvConfig | None = None, **kwargs) -> DynamicRankEnv:
    """A live-backend environment for ``config`` (or keyword arguments)."""
    config = config if config is not None else EnvConfig(**kwargs)
    return DynamicRankEnv(replace(config, backend="live"))


def actions_of(env: DynamicRankEnv, ranks) -> np.ndarray:
    """The actions (S, L) of a schedule of ranks, on a grid where each rank is one action.

    Raises:
        ValueError: A rank is not in the grid, or names several actions (a pair grid).
    """
    table = np.asarray(ranks)
    return np.vectorize(lambda rank: env.actions.index(int(rank)), otypes=[np.int64])(table)


def replay(env: DynamicRankEnv, window: int, actions) -> ReplayResult:
    """Run ``actions`` (S, L) on ``window`` of ``env`` and return what it measured.

    Raises:
        ValueError: ``actions`` has the wrong shape or holds an index outside the grid.
    """
    trace = play_episode(env, np.asarray(actions), window)
    return ReplayResult(trace.window, trace.actions, trace.rewards, trace.summary)


def validate(
    env: DynamicRankEnv,
    window: int,
    actions,
    rewards=None,
    perplexity: float | None = None,
    executed=None,
) -> ReplayResult:
    """Replay and check recorded ``rewards`` (per step) and ``perplexity``.

    Rewards of a backend that replays bit for bit (``env.bitwise_replay``: cached) must
    replay exactly; others (live) within :data:`REWARD_RTOL` and :data:`REWARD_ATOL`,
    perplexity within :data:`PERPLEXITY_RTOL`.

    Args:
        env: The environment the episode was recorded on (same configuration).
        window: The window index.
        actions: The actions (S, L) to play: the executed ones, or the requested ones
            when ``executed`` is given.
        rewards: Recorded per-step rewards; None: not checked.
        perplexity: Recorded perplexity (live backend); None: not checked.
        executed: Recorded executed actions (S, L) when ``actions`` are the requested ones:
            the action mask must replace the masked requests as it did when recorded.
            None: ``actions`` were executed as they are, so the mask must change none.

    Raises:
        ReplayMismatch: A recorded number is not reproduced within the tolerances, or the
            mask executes other actions than recorded.
    """
    reward_rtol, reward_atol = reward_tolerance(env.bitwise_replay)
    result = replay(env, window, actions)
    expected = np.asarray(actions if executed is None else executed)
    if not np.array_equal(result.actions, expected):
        if executed is None or result.actions.shape != expected.shape:
            raise ReplayMismatch(f"window {window}: the action mask changed actions on replay")
        segment, layer = np.argwhere(result.actions != expected)[0]
        raise ReplayMismatch(
            f"window {window}: the action executed at segment {segment}, layer {layer} "
            f"replays as {int(result.actions[segment, layer])}, recorded "
            f"{int(expected[segment, layer])} (requested "
            f"{int(np.asarray(actions)[segment, layer])})"
        )
    if rewards is not None:
        recorded = np.asarray(rewards, dtype=np.float64)
        if recorded.shape != result.rewards.shape:
            raise ReplayMismatch(
                f"window {window}: {recorded.size} rewards recorded, the episode has "
                f"{result.rewards.size} steps"
            )
        if not np.allclose(result.rewards, recorded, rtol=reward_rtol, atol=reward_atol):
            worst = int(np.argmax(np.abs(result.rewards - recorded)))
            raise ReplayMismatch(
                f"window {window}: reward of step {worst} replays as {result.rewards[worst]!r}, "
                f"recorded {recorded[worst]!r}"
            )
    if perplexity is not None:
        if result.perplexity is None:
            raise ReplayMismatch("perplexity needs the live backend")
        if not np.isclose(result.perplexity, perplexity, rtol=PERPLEXITY_RTOL, atol=0):
            raise ReplayMismatch(
                f"window {window}: perplexity replays as {result.perplexity!r}, "
                f"recorded {perplexity!r}"
            )
    return result

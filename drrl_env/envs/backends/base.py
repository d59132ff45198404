"""The backend Protocol: everything the Gym front end needs of what runs a step.

The front end (:class:`~drrl_env.envs.dynamic_rank.DynamicRankEnv`) never reaches into a
backend: it reads the attributes and calls the methods of :class:`Backend`. Two backends
implement it: :class:`~drrl_env.envs.backends.cached.CachedBackend` (teacher-forced
lookups, for training) and :class:`~drrl_env.envs.backends.live.LiveBackend` (the model
closed loop, for evaluation).

A backend declares what it can do (``teacher_forced``, ``bitwise_replay``); code outside
:mod:`drrl_env.envs` asks the environment for those capabilities (``env.unwrapped``
forwards them) instead of testing the backend's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from drrl_env.lm.facts import ModelShape

if TYPE_CHECKING:
    from drrl_env.envs.problem import Problem

__all__ = ["Backend", "CostTable", "LayerView", "ModelShape"]


@dataclass(frozen=True)
class LayerView:
    """What the observation shows of the layer about to run."""

    spectrum: np.ndarray  # (d,) energies in truncation order, summing to 1
    input_stats: np.ndarray  # (3,)


@dataclass(frozen=True)
class CostTable:
    """Executed and exact attention FLOPs of one layer call, per segment and action.

    For a method whose cost depends on the input (``static == False``, e.g. ``topp``, whose
    kept keys follow the attention mass), ``executed`` is an upper bound of what an action
    can execute (every causal key kept; its floor action ``keep = 0`` is exact), the bound
    the budget wall plans with; the realised FLOPs and kept fraction of each step come from
    the backend (``execute`` returns them as ``flops`` and ``kept``).

    Attributes:
        executed: (S, A) FLOPs of each action at each segment (features included).
        full: (S,) FLOPs of exact attention at each segment.
        kept: (S, A) keys attended exactly / causal keys (static methods; the bound else).
        static: Whether ``executed`` is what every call executes.
    """

    executed: np.ndarray
    full: np.ndarray
    kept: np.ndarray | None = None
    static: bool = True

    @property
    def ratios(self) -> np.ndarray:
        """(S, A) executed / exact FLOPs."""
        return self.executed / self.full[:, None]


class Backend(Protocol):
    """What runs the steps of a dynamic-rank environment.

    A backend is built from a :class:`~drrl_env.envs.problem.Problem`, which holds what the
    configuration determines (shape, action grid, method, costs, weight statistics).

    Attributes:
        problem: The problem it runs.
        n_windows: Windows of the split an episode can read.
        tokens: (n_windows, seq_len) token ids of the windows (replay, evaluation).
        teacher_forced: Whether the layer inputs are exact attention's whatever the actions:
            every action's measurements are stored lookups (:meth:`candidates`,
            :meth:`rollout`) and the views do not depend on the actions
            (:meth:`episode_views`). True for the cached backend, False for the live one.
        bitwise_replay: Whether an episode replays bit for bit (every number a lookup of
            stored values), so replayed rewards must equal the recorded ones (within
            :data:`~drrl_env.replay.EXACT`); False
            when numbers come from float32 kernels whose summation order varies with the
            thread count and CPU (then :func:`drrl_env.replay.reward_tolerance` applies).
    """

    problem: Problem
    n_windows: int
    tokens: np.ndarray
    teacher_forced: bool
    bitwise_replay: bool

    def begin(self, window: int) -> LayerView:
        """Start ``window``; return the view of its first layer call."""

    def execute(self, segment: int, layer: int, action: int) -> dict[str, float]:
        """Run ``action`` at (segment, layer); return its raw measurements (drrl_env.rewards).

        With input-dependent costs (``costs.static`` False) also ``flops`` (realised FLOPs
        of the call) and ``kept`` (its kept fraction of the causal keys).
        """

    def view(self) -> LayerView:
        """The view of the next layer call (after :meth:`execute`)."""

    def episode_views(self, window: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Every view of ``window`` at once when they do not depend on the actions.

        Returns (spectra (steps, d), input_stats (steps, 3)) for a teacher-forced backend,
        None for a closed-loop one (views then come from :meth:`view` step by step).
        """

    def candidates(self, segment: int, layer: int) -> dict[str, np.ndarray]:
        """Raw measurements of every action at (segment, layer), without executing.

        Only a teacher-forced backend knows them (lookups); others raise RuntimeError.
        """

    def rollout(self, name: str, window: int | None = None) -> np.ndarray:
        """The stored teacher-forced array ``name`` (e.g. ``cosine``, ``spectra``).

        Of one ``window`` (its shape in the store, e.g. (S, L, A)), or of every window
        stacked, (n_windows, ...), when ``window`` is None. Reads are verified (a corrupt
        window is rebuilt). Only a teacher-forced backend stores them; others raise
        RuntimeError.
        """

    def finish(self) -> dict:
        """Numbers of the finished episode the backend alone knows (e.g. perplexity)."""

    def close(self) -> None:
        """Release what the backend holds (a suspended forward pass)."""

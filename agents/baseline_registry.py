"""One registry of baselines: a baseline is one builder plus one registration.

Every baseline a script can list is registered here under a name, with a builder that takes
a :class:`BaselineContext` (the env it will act in, and on request cached envs of the train
windows and of the windows it will be scored on) and its typed parameters. A run lists
:class:`Baseline` values, a name with parameters, e.g. ``Baseline.of("static_rank",
rank=16)``; its label (``static_16``) names its rows. Nothing parses a label back into a
baseline.

    from agents.baseline_registry import Baseline, BaselineContext, register_baseline

    def build(context, action=0):
        return StaticRankPolicy(context.env, context.env.unwrapped.ranks[action])

    register_baseline("first_action", build, label=lambda action=0: f"first_{action}")
    policy = Baseline.of("first_action").build(BaselineContext(env))

Baselines that look up every action in the cached measurements (the greedy oracle, the
Lagrangian greedy, the per-window optimum) pick their schedules on the context's held-out
cached env and replay them on the env they act in (which may be live).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from agents.baselines import (
    BaselinePolicy,
    EnergyThresholdPolicy,
    FullRankPolicy,
    GreedyOraclePolicy,
    SchedulePolicy,
    StaticRankPolicy,
    UniformRandomPolicy,
)
from agents.budget_baselines import (
    BestUniformPolicy,
    LagrangianGreedyPolicy,
    StaticAllocationPolicy,
    dp_schedule,
)
from agents.evaluation import actor
from drrl_env.episodes import play_episode


@dataclass
class BaselineContext:
    """What a baseline is built from.

    Attributes:
        env: The env it acts in (cached or live).
        train: Builds a cached env of the same grid on train windows (baselines fitted on
            measurements); None if the caller has none.
        held_out: Builds a cached env on the windows ``env`` plays (lookup baselines);
            None: ``env`` itself when it is cached.
        windows: The windows it will be scored on (lookup baselines plan these).
    """

    env: gym.Env
    train: Callable[[], gym.Env] | None = None
    held_out: Callable[[], gym.Env] | None = None
    windows: Sequence[int] = ()

    def train_env(self, name: str) -> gym.Env:
        if self.train is None:
            raise ValueError(f"baseline {name!r} is fitted on cached train windows: pass train=")
        return self.train()

    def lookup_env(self, name: str) -> gym.Env:
        if self.held_out is not None:
            return self.held_out()
        if self.env.unwrapped.teacher_forced:
            return self.env
        raise ValueError(
            f"baseline {name!r} looks up every action: pass held_out= (a cached env of the "
            "windows it plays) or act in a cached env"
        )

    def scored_windows(self) -> list[int]:
        return [int(w) for w in self.windows] or list(range(self.env.unwrapped.n_windows))


@dataclass(frozen=True)
class BaselineSpec:
    """A registered baseline.

    Attributes:
        build: ``build(context, **params) -> BaselinePolicy``.
        label: ``label(**params) -> str``, the name of its rows (default: the registry name).
        budgeted: True if it needs a budgeted env, False if it needs an unbudgeted one,
            None if either.
        description: One line for listings.
    """

    build: Callable[..., BaselinePolicy]
    label: Callable[..., str] | None = None
    budgeted: bool | None = None
    description: str = ""


BASELINES: dict[str, BaselineSpec] = {}
"""Registry name -> :class:`BaselineSpec`."""


def register_baseline(
    name: str,
    build: Callable[..., BaselinePolicy],
    *,
    label: Callable[..., str] | None = None,
    budgeted: bool | None = None,
    description: str = "",
) -> None:
    """Register a baseline; ValueError if ``name`` is taken or not an identifier."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a baseline name must be an identifier, got {name!r}")
    if name in BASELINES:
        raise ValueError(f"baseline {name!r} is already registered")
    BASELINES[name] = BaselineSpec(build, label, budgeted, description)


@dataclass(frozen=True)
class Baseline:
    """A registered baseline with its parameters (what a run lists)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, **params: Any) -> Baseline:
        """``Baseline.of("static_rank", rank=16)``; ValueError listing the names if unknown."""
        spec(name)
        return cls(name, tuple(sorted(params.items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """The name of its rows, e.g. ``static_16``."""
        label = spec(self.name).label
        return self.name if label is None else label(**self.kwargs)

    def build(self, context: BaselineContext) -> BaselinePolicy:
        """The policy, acting in ``context.env``.

        Raises:
            ValueError: The env has a budget and the baseline needs none, or the reverse.
        """
        entry = spec(self.name)
        has_budget = context.env.unwrapped.config.budget is not None
        if entry.budgeted is not None and entry.budgeted != has_budget:
            need = "a budgeted env" if entry.budgeted else "an env without a budget"
            raise ValueError(f"baseline {self.name!r} needs {need}")
        return entry.build(context, **self.kwargs)


def spec(name: str) -> BaselineSpec:
    """The spec of ``name``; ValueError listing the registered names if unknown."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; registered: {', '.join(BASELINES)}")
    return BASELINES[name]


def make_baseline(
    name: str,
    env: gym.Env,
    *,
    train: gym.Env | Callable[[], gym.Env] | None = None,
    held_out: gym.Env | Callable[[], gym.Env] | None = None,
    windows: Sequence[int] = (),
    **params: Any,
) -> BaselinePolicy:
    """Build the registered baseline ``name`` with ``params`` for ``env``.

    Args:
        name: A name of :data:`BASELINES`.
        env: The env it acts in.
        train, held_out: Cached envs (or functions building them) of the train windows and of
            the windows it plays, for the baselines that need them (see
            :class:`BaselineContext`).
        windows: The windows it will be scored on (lookup baselines).
        **params: Its parameters, e.g. ``rank=16``, ``tau=0.9``, ``seed=0``.

    Raises:
        ValueError: Unknown name (the message lists the registered ones) or bad parameters.
    """

    def deferred(value):
        if value is None or (callable(value) and not isinstance(value, gym.Env)):
            return value
        return lambda: value

    context = BaselineContext(env, deferred(train), deferred(held_out), windows)
    return Baseline.of(name, **params).build(context)


def lookup_schedules(build, context: BaselineContext, name: str) -> dict[int, np.ndarray]:
    """The actions a lookup policy (``build(env)``) takes on the held-out cached windows."""
    env = context.lookup_env(name)
    policy = build(env)
    return {
        window: play_episode(env, actor(policy), window).actions
        for window in context.scored_windows()
    }


def _greedy_oracle(context: BaselineContext) -> BaselinePolicy:
    schedules = lookup_schedules(GreedyOraclePolicy, context, "greedy_oracle")
    return SchedulePolicy(context.env, schedules, "greedy_oracle")


def _lagrangian_greedy(context: BaselineContext) -> BaselinePolicy:
    train = context.train_env("lagrangian_greedy")
    schedules = lookup_schedules(
        lambda env: LagrangianGreedyPolicy(env, train), context, "lagrangian_greedy"
    )
    return SchedulePolicy(context.env, schedules, "lagrangian_greedy")


def _dp_optimum(context: BaselineContext) -> BaselinePolicy:
    held_out = context.lookup_env("dp_optimum")
    schedules = {w: dp_schedule(held_out, w) for w in context.scored_windows()}
    return SchedulePolicy(context.env, schedules, "dp_optimum")


register_baseline(
    "full_rank", lambda context: FullRankPolicy(context.env), description="exact attention"
)
register_baseline(
    "static_rank",
    lambda context, rank, keep=None: StaticRankPolicy(context.env, rank, keep),
    label=lambda rank, keep=None: (
        f"static_{int(rank)}" + ("" if keep is None else f"_keep{float(keep):g}")
    ),
    description="one setting of the grid at every step",
)
register_baseline(
    "energy_threshold",
    lambda context, tau: EnergyThresholdPolicy(context.env, tau),
    label=lambda tau: f"energy_{float(tau):g}",
    description="the smallest rank keeping tau of the spectral energy (Adaptive SVD)",
)
register_baseline(
    "uniform_random",
    lambda context, seed=0: UniformRandomPolicy(context.env, seed=seed),
    description="a uniformly random allowed action",
)
register_baseline(
    "greedy_oracle",
    _greedy_oracle,
    description="the best immediate reward, looked up (not deployable)",
)
register_baseline(
    "best_uniform",
    lambda context: BestUniformPolicy(context.env, context.train_env("best_uniform")),
    budgeted=True,
    description="the best single action meeting the budget, fitted on train windows",
)
register_baseline(
    "static_allocation",
    lambda context: StaticAllocationPolicy(context.env, context.train_env("static_allocation")),
    budgeted=True,
    description="one action per layer by a knapsack over layers, fitted on train windows",
)
register_baseline(
    "lagrangian_greedy",
    _lagrangian_greedy,
    budgeted=True,
    description="fidelity minus a tuned FLOPs price, looked up (not deployable)",
)
register_baseline(
    "dp_optimum",
    _dp_optimum,
    budgeted=True,
    description="the per-window knapsack optimum, looked up (not deployable)",
)

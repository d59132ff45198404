"""Learning curves: an agent's eval return while it trains, next to baselines on the same windows.

:class:`LearningCurveCallback` plays the model deterministically (:func:`agents.evaluation.actor`,
masks honoured for MaskablePPO) on a fixed list of windows of a cached (teacher-forced) env at
the start of training, every ``every`` timesteps (at the first rollout start past each multiple
of ``every``, when the latest update is in) and at the end. Each evaluation is a row of
:attr:`LearningCurveCallback.history`:

- ``timesteps``: the model's ``num_timesteps`` when it was played;
- ``eval_return_mean``, ``eval_return_std``: mean and standard deviation over the windows of
  the undiscounted episode return;
- ``mean_fidelity``, ``flops_ratio``: means over the windows of the episode summaries;
- ``baseline_<name>``: each baseline's mean return on the same windows (played once, when
  the callback is built: :func:`baseline_returns`).

The same numbers go to the SB3 logger (TensorBoard) under ``curve/eval_return``,
``curve/eval_return_std``, ``curve/mean_fidelity``, ``curve/flops_ratio`` and
``curve/baseline_<name>``, at step ``timesteps``. :func:`plot_curves` draws the rows of one or
several runs (one line per agent, a min-max band over seeds, baselines as dashed lines)::

    from agents.curves import LearningCurveCallback, plot_curves

    curve = LearningCurveCallback(eval_env, windows=[0, 1], every=1_000, baselines=baselines)
    model.learn(10_000, callback=curve)
    plot_curves(pd.DataFrame(curve.history).assign(agent="ppo_mlp"), "curve.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from agents.baselines import BaselinePolicy
from agents.evaluation import Policy, actor, episode_return
from agents.factory import check_spaces_match
from drrl_env.episodes import Chooser, Trace, play_episode
from harness.reporting import pyplot, save_figure

PREFIX = "curve"
"""Namespace of the TensorBoard scalars."""
BASELINE_PREFIX = "baseline_"
"""Prefix of the baseline columns of a curve row (``baseline_<name>``)."""
CURVE_COLUMNS = ("timesteps", "eval_return_mean", "eval_return_std", "mean_fidelity")
CURVE_COLUMNS += ("flops_ratio",)
"""Columns of every curve row; the ``baseline_<name>`` columns follow."""


def check_curve_env(env: gym.Env) -> None:
    """ValueError unless ``env`` is a teacher-forced (cached backend) dynamic-rank env."""
    if not getattr(env.unwrapped, "teacher_forced", False):
        raise ValueError(
            "a learning curve replays its windows many times and needs the cached backend: "
            "build eval_env with backend='cached' (a teacher-forced env)"
        )


def check_windows(env: gym.Env, windows: Sequence[int]) -> list[int]:
    """``windows`` as a list of ints, each a window of ``env``; ValueError otherwise."""
    windows = list(windows)
    if not windows:
        raise ValueError("windows must name at least one window to evaluate on")
    n_windows = env.unwrapped.n_windows
    for window in windows:
        if isinstance(window, bool) or not isinstance(window, int | np.integer):
            raise ValueError(f"windows: {window!r} is not a window index")
        if not 0 <= window < n_windows:
            raise ValueError(f"windows: {window} is outside the env's windows 0..{n_windows - 1}")
    return [int(window) for window in windows]


def play_windows(env: gym.Env, policy: Policy | Chooser, windows: Sequence[int]) -> list[Trace]:
    """Play each of ``windows`` with ``policy`` (a model or baseline, deterministic, or a
    chooser of :func:`drrl_env.episodes.play_episode`)."""
    choose = actor(policy) if isinstance(policy, BaseAlgorithm | BaselinePolicy) else policy
    if not callable(choose):
        raise TypeError(f"{policy!r} is neither an SB3 model, a baseline nor a chooser")
    return [play_episode(env, choose, window) for window in windows]


def baseline_returns(
    env: gym.Env, windows: Sequence[int], policies: Mapping[str, Policy | Chooser]
) -> dict[str, float]:
    """Each policy's mean undiscounted return over ``windows`` of ``env``, by name.

    Args:
        env: The env the policies act in (a lookup baseline, e.g. the greedy oracle, must
            have been built for this very env).
        windows: The windows played, each once per policy.
        policies: Name -> SB3 model, baseline, or chooser ``choose(observation, env)``.
    """
    returns = {}
    for name, policy in policies.items():
        traces = play_windows(env, policy, windows)
        returns[name] = float(np.mean([episode_return(trace.rewards) for trace in traces]))
    return returns


class LearningCurveCallback(BaseCallback):
    """Evaluate the model on fixed windows at the start, every ``every`` timesteps and at the end.

    SB3 updates the model between rollouts (on-policy algorithms after each rollout of
    ``n_steps`` per env, off-policy ones every ``train_freq`` steps), so the callback
    evaluates at the start of the first rollout once ``num_timesteps`` has reached the next
    multiple of ``every``: the row's ``timesteps`` is that rollout boundary, and every row
    plays a policy the rows before it have not (an evaluation in the middle of a rollout
    would repeat the last one). Like SB3's ``EvalCallback`` it dumps the logger at each
    evaluation, at step ``timesteps``.

    Args:
        eval_env: A dynamic-rank env with the cached backend (``backend='cached'``), not the
            training env; e.g. the cached ``split='eval'`` env.
        windows: The windows played at every evaluation.
        every: Timesteps (all envs together) between two evaluations.
        baselines: Name -> SB3 model, baseline or chooser, played once on the same windows
            of ``eval_env`` (a lookup baseline must be built for ``eval_env``).
        verbose: SB3 verbosity.

    Attributes:
        history: One row per evaluation (see the module docstring), oldest first.
        baselines: Each baseline's mean return on the windows, by name.

    Raises:
        ValueError: ``every < 1``, no window or one outside the env, or an env that is not
            teacher-forced.
    """

    def __init__(
        self,
        eval_env: gym.Env,
        windows: Sequence[int],
        every: int,
        baselines: Mapping[str, Policy | Chooser] | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
            raise ValueError(
                f"every must be an int >= 1 (timesteps between evaluations): {every!r}"
            )
        check_curve_env(eval_env)
        self.eval_env = eval_env
        self.windows = check_windows(eval_env, windows)
        self.every = int(every)
        self.baselines = baseline_returns(eval_env, self.windows, baselines or {})
        self.history: list[dict[str, float]] = []
        self._next = self.every

    def _init_callback(self) -> None:
        check_spaces_match(self.model.observation_space, self.model.action_space, self.eval_env)

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every
        self.evaluate()

    def _on_rollout_start(self) -> None:
        if self.num_timesteps >= self._next:
            self._next = (self.num_timesteps // self.every + 1) * self.every
            self.evaluate()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Play the model on the windows now, add the row to :attr:`history` and the logger.

        A model already played at this ``num_timesteps`` is not played again (no step, so
        no update since): the last row is returned.
        """
        if self.history and self.history[-1]["timesteps"] == self.num_timesteps:
            return self.history[-1]
        traces = play_windows(self.eval_env, self.model, self.windows)
        returns = np.array([episode_return(trace.rewards) for trace in traces])
        row: dict[str, Any] = {
            "timesteps": int(self.num_timesteps),
            "eval_return_mean": float(returns.mean()),
            "eval_return_std": float(returns.std()),
            "mean_fidelity": float(np.mean([t.summary["mean_fidelity"] for t in traces])),
            "flops_ratio": float(np.mean([t.summary["flops_ratio"] for t in traces])),
            **{f"{BASELINE_PREFIX}{name}": value for name, value in self.baselines.items()},
        }
        self.history.append(row)
        self.logger.record(f"{PREFIX}/eval_return", row["eval_return_mean"])
        for key in CURVE_COLUMNS[2:]:
            self.logger.record(f"{PREFIX}/{key}", row[key])
        for name, value in self.baselines.items():
            self.logger.record(f"{PREFIX}/{BASELINE_PREFIX}{name}", value)
        self.logger.dump(self.num_timesteps)
        return row


def read_curves(folder: str | Path) -> pd.DataFrame:
    """The curve rows of every ``*.csv`` in ``folder`` (sorted by name), one frame; empty
    if there are none."""
    paths = sorted(Path(folder).glob("*.csv"))
    if not paths:
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    return pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)


def plot_curves(frame: pd.DataFrame, path: str | Path) -> Path:
    """Mean eval return against timesteps: one line per agent, baselines as dashed lines.

    Args:
        frame: Curve rows (:data:`CURVE_COLUMNS`, ``baseline_<name>`` columns) with the
            agent's name in ``agent`` or ``policy`` (else one unnamed agent), optionally a
            ``seed`` (several seeds: their mean, and a band from their min to their max) and
            a ``method`` (one panel per method).
        path: The PNG written (parent folders are made).

    Raises:
        ValueError: No rows, or ``timesteps`` or ``eval_return_mean`` missing.
    """
    plt = pyplot()

    missing = [column for column in CURVE_COLUMNS[:2] if column not in frame]
    if missing or frame.empty:
        raise ValueError(
            f"plot_curves needs curve rows with {list(CURVE_COLUMNS[:2])}; "
            f"got {len(frame)} rows, missing {missing}"
        )
    panels = list(frame.groupby("method", sort=False)) if "method" in frame else [(None, frame)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (method, part) in zip(axes[0], panels, strict=True):
        _plot_agents(ax, part)
        _plot_baselines(ax, part, plt.get_cmap("Dark2"))
        ax.set_xlabel("timesteps")
        ax.set_ylabel("mean eval return")
        if method is not None:
            ax.set_title(str(method))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def _plot_agents(ax, frame: pd.DataFrame) -> None:
    name_column = next((c for c in ("agent", "policy") if c in frame), None)
    groups = frame.groupby(name_column, sort=False) if name_column else [("agent", frame)]
    for name, part in groups:
        seeds = part["seed"].nunique() if "seed" in part else 1
        steps = part.groupby("timesteps")["eval_return_mean"].agg(["mean", "min", "max"])
        label = str(name) if seeds == 1 else f"{name} (mean, min-max of {seeds} seeds)"
        (line,) = ax.plot(steps.index, steps["mean"], "o-", markersize=3, label=label)
        if seeds > 1:
            ax.fill_between(
                steps.index, steps["min"], steps["max"], color=line.get_color(), alpha=0.2
            )


def _plot_baselines(ax, frame: pd.DataFrame, colors) -> None:
    columns = [c for c in frame if str(c).startswith(BASELINE_PREFIX) and frame[c].notna().any()]
    for index, column in enumerate(columns):
        name, value = column.removeprefix(BASELINE_PREFIX), float(frame[column].mean())
        ax.axhline(value, linestyle="--", linewidth=1, color=colors(index % colors.N), label=name)
        ax.annotate(
            name,
            xy=(1.0, value),
            xycoords=("axes fraction", "data"),
            xytext=(-3, 2),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color=colors(index % colors.N),
        )

"""Leaderboard evaluation: any policy on a fixed list of windows, one CSV row per window.

A policy is a trained SB3 model or a baseline of :mod:`agents.baselines`; both act through
``predict(observation, deterministic=True)`` (MaskablePPO also receives the env's
``action_masks()``). Each row records what the episode measured and everything needed to
recompute it: the executed ranks, the requested ranks and the per-step rewards.
:func:`replay_csv` re-runs every row with :func:`drrl_env.replay.validate` and re-derives
each number of the row, raising :class:`~drrl_env.replay.ReplayMismatch` on a difference.

Columns: ``policy``, ``window``, ``backend``, ``return``, ``mean_fidelity``, ``flops_ratio``,
``flops_reduction``, ``mean_perturbation``, ``mean_rank``, ``masked_actions``, ``actions``
and ``requested_actions`` (JSON, segments x layers), ``ranks`` and ``requested_ranks``
(the ranks of those actions), ``rewards`` (JSON, per step), ``perplexity`` and
``perplexity_full`` (live backend; empty on the cached one) and ``env_config`` (JSON of the
env configuration, cache folder and device left out). Replay re-derives every number
within the tolerances of :mod:`drrl_env.replay`: FLOPs and ranks exactly, measured
numbers within the float32 run-to-run spread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from sb3_contrib import MaskablePPO
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.baselines import BaselinePolicy, GreedyOraclePolicy
from agents.factory import ALGO_ATTRIBUTE, POLICY_ATTRIBUTE, check_spaces_match
from drrl_env.replay import (
    EXACT,
    PERPLEXITY_RTOL,
    ReplayMismatch,
    ReplayResult,
    actions_of,
    reward_tolerance,
    validate,
)

Policy = BaseAlgorithm | BaselinePolicy

COLUMNS = (
    "policy",
    "window",
    "backend",
    "return",
    "mean_fidelity",
    "flops_ratio",
    "flops_reduction",
    "mean_perturbation",
    "mean_rank",
    "masked_actions",
    "actions",
    "requested_actions",
    "ranks",
    "requested_ranks",
    "rewards",
    "perplexity",
    "perplexity_full",
    "env_config",
)
SUMMARY_COLUMNS = (
    "mean_fidelity",
    "flops_ratio",
    "flops_reduction",
    "mean_perturbation",
    "mean_rank",
)
DERIVED_COLUMNS = ("return", *SUMMARY_COLUMNS, "masked_actions", "perplexity", "perplexity_full")
_FLOAT_COLUMNS = ("return", *SUMMARY_COLUMNS, "perplexity", "perplexity_full")
_INT_COLUMNS = ("window", "masked_actions")
_CONFIG_IGNORED = ("cache_dir", "device", "backend")


def predict_action(policy: Policy, observation: np.ndarray, env: gym.Env) -> int:
    """The deterministic action of ``policy`` (a MaskablePPO also gets the env's masks)."""
    if isinstance(policy, MaskablePPO):
        masks = env.unwrapped.action_masks()
        action, _ = policy.predict(observation, deterministic=True, action_masks=masks)
    else:
        action, _ = policy.predict(observation, deterministic=True)
    return int(action)


def policy_name(policy: Policy) -> str:
    """``algo_policy`` of a model built by ``make_agent``, a baseline's name, else the class."""
    if isinstance(policy, BaselinePolicy):
        return policy.name
    algo, kind = getattr(policy, ALGO_ATTRIBUTE, None), getattr(policy, POLICY_ATTRIBUTE, None)
    if algo is not None:
        return f"{algo}_{kind}" if kind else algo
    return type(policy).__name__


def run_episode(policy: Policy, env: gym.Env, window: int, name: str) -> dict[str, Any]:
    """Play one episode of ``window`` with ``policy`` and return its leaderboard row."""
    observation, _ = env.reset(options={"window": int(window)})
    rewards: list[float] = []
    requested: list[int] = []
    info: dict[str, Any] = {}
    done = False
    while not done:
        observation, reward, terminated, truncated, info = env.step(
            predict_action(policy, observation, env)
        )
        rewards.append(float(reward))
        requested.append(int(info["requested_action"]))
        done = terminated or truncated
    if "episode_summary" not in info:
        raise RuntimeError(f"window {window}: the episode was cut before its last step")
    return _row(name, env, info["episode_summary"], rewards, requested)


def evaluate_policy_on_windows(
    policy: Policy,
    env: gym.Env,
    windows: Iterable[int],
    csv_path: str | Path | None = None,
    name: str | None = None,
) -> pd.DataFrame:
    """Evaluate ``policy`` on each of ``windows`` of ``env``; one row per window.

    Args:
        policy: A trained SB3 model or a baseline built for ``env``.
        env: The evaluation env (e.g. ``split="eval"``; ``backend="live"`` adds perplexity).
        windows: The window indices, in order.
        csv_path: Where to write the rows as CSV (parent folders are made); None: no file.
        name: The ``policy`` column; by default :func:`policy_name`.

    Raises:
        ValueError: The policy was built for another env or observation size, or a window
            is out of range.
    """
    _check_policy_fits(policy, env)
    name = name if name is not None else policy_name(policy)
    rows = [run_episode(policy, env, window, name) for window in windows]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    if csv_path is not None:
        write_csv(frame, csv_path)
    return frame


def leaderboard(
    policies: Mapping[str, Policy],
    env: gym.Env,
    windows: Sequence[int],
    csv_path: str | Path | None = None,
) -> pd.DataFrame:
    """Evaluate several policies on the same windows of the same env; one CSV for all."""
    frames = [
        evaluate_policy_on_windows(policy, env, windows, name=name)
        for name, policy in policies.items()
    ]
    frame = pd.concat(frames, ignore_index=True)
    if csv_path is not None:
        write_csv(frame, csv_path)
    return frame


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per policy: the mean over windows of every numeric column, best return first."""
    numeric = ["return", *SUMMARY_COLUMNS, "masked_actions", "perplexity", "perplexity_full"]
    table = frame.groupby("policy", sort=False)[numeric].mean()
    return table.sort_values("return", ascending=False)


def write_csv(frame: pd.DataFrame, csv_path: str | Path) -> Path:
    """Write leaderboard rows (floats at full precision; NaN as an empty field)."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def read_csv(csv_path: str | Path) -> pd.DataFrame:
    """Read leaderboard rows back, every float exactly as written (Python's own parser)."""
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    for column in _FLOAT_COLUMNS:
        frame[column] = [float(value) if value else math.nan for value in frame[column]]
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype(int)
    return frame


def replay_csv(csv_path: str | Path, env: gym.Env) -> pd.DataFrame:
    """Replay every row of a leaderboard CSV on ``env`` and re-derive each of its numbers.

    ``env`` must have the configuration the rows were produced with (backend included:
    the rows' perplexities need the live backend).

    Returns:
        The re-derived rows (``policy``, ``window`` and :data:`DERIVED_COLUMNS`).

    Raises:
        ValueError: ``env``'s backend or configuration differs from the rows'.
        ReplayMismatch: A recorded number is not reproduced within its tolerance
            (:func:`column_tolerance`).
    """
    derived = [replay_row(record, env) for record in read_csv(csv_path).to_dict("records")]
    return pd.DataFrame(derived, columns=["policy", "window", *DERIVED_COLUMNS])


def replay_row(record: dict[str, Any], env: gym.Env) -> dict[str, Any]:
    """Replay one leaderboard row and check every number it holds (see :func:`replay_csv`)."""
    base = env.unwrapped
    _check_row_env(record, base)
    if record.get("actions"):
        actions = np.asarray(json.loads(record["actions"]))
        requested = json.loads(record["requested_actions"])
    else:  # rows written before actions were recorded: one action per rank
        actions = actions_of(base, json.loads(record["ranks"]))
        requested = actions_of(base, json.loads(record["requested_ranks"])).tolist()
    result = validate(
        base,
        int(record["window"]),
        actions,
        rewards=json.loads(record["rewards"]),
        perplexity=_optional(record["perplexity"]),
    )
    derived = _derived(result, requested)
    _compare(record, derived, base.steps)
    return {"policy": record["policy"], "window": int(record["window"]), **derived}


def episode_return(rewards: Sequence[float]) -> float:
    """The undiscounted return, summed exactly (independent of summation order)."""
    return math.fsum(rewards)


def config_json(env: gym.Env) -> str:
    """The env's configuration as JSON, without the fields that do not change numbers."""
    config = env.unwrapped.config.as_dict()
    kept = {k: v for k, v in config.items() if k not in _CONFIG_IGNORED}
    return json.dumps(kept, sort_keys=True)


def _row(
    name: str, env: gym.Env, summary: dict, rewards: list[float], requested: list[int]
) -> dict[str, Any]:
    base = env.unwrapped
    shape = np.asarray(summary["actions"]).shape
    requested_actions = np.reshape(requested, shape)
    return {
        "policy": name,
        "window": int(summary["window"]),
        "backend": base.config.backend,
        "return": episode_return(rewards),
        **{key: float(summary[key]) for key in SUMMARY_COLUMNS},
        "masked_actions": int(summary["masked_actions"]),
        "actions": json.dumps(summary["actions"]),
        "requested_actions": json.dumps(requested_actions.tolist()),
        "ranks": json.dumps(summary["ranks"]),
        "requested_ranks": json.dumps(base.actions.ranks[requested_actions].tolist()),
        "rewards": json.dumps(rewards),
        "perplexity": _nan_if_none(summary.get("perplexity")),
        "perplexity_full": _nan_if_none(summary.get("perplexity_full")),
        "env_config": config_json(env),
    }


def _derived(result: ReplayResult, requested: list) -> dict[str, Any]:
    executed = np.asarray(result.actions)
    requested_array = np.asarray(requested)
    if requested_array.shape != executed.shape:
        raise ReplayMismatch(
            f"window {result.window}: requested actions of shape {requested_array.shape}, "
            f"executed {executed.shape}"
        )
    summary = result.summary
    return {
        "return": episode_return(result.rewards.tolist()),
        **{key: float(summary[key]) for key in SUMMARY_COLUMNS},
        "masked_actions": int(np.sum(requested_array != executed)),
        "perplexity": _nan_if_none(summary.get("perplexity")),
        "perplexity_full": _nan_if_none(summary.get("perplexity_full")),
    }


def column_tolerance(column: str, steps: int, backend: str) -> tuple[float, float]:
    """(relative, absolute) tolerance of a replayed column (see :mod:`drrl_env.replay`).

    Counts and FLOPs follow from the actions alone, and every cached number is a lookup:
    they must replay exactly. Measured live numbers get the float32 run-to-run tolerance
    (summed over the episode for the return).
    """
    if column in ("perplexity", "perplexity_full"):
        return PERPLEXITY_RTOL, 0.0
    rtol, atol = reward_tolerance(backend)
    if column == "return":
        return rtol, atol * steps
    if column in ("mean_fidelity", "mean_perturbation"):
        return rtol, atol
    return EXACT, EXACT


def _compare(record: dict[str, Any], derived: dict[str, Any], steps: int) -> None:
    for column, value in derived.items():
        recorded = float(record[column])
        rel, abs_ = column_tolerance(column, steps, record["backend"])
        same = (math.isnan(recorded) and math.isnan(value)) or math.isclose(
            recorded, value, rel_tol=rel, abs_tol=abs_
        )
        if not same:
            raise ReplayMismatch(
                f"{record['policy']} window {record['window']}: {column} replays as "
                f"{value!r}, recorded {recorded!r}"
            )


def _check_row_env(record: dict[str, Any], base: gym.Env) -> None:
    if record["backend"] != base.config.backend:
        raise ValueError(
            f"the row of {record['policy']} window {record['window']} was produced on the "
            f"{record['backend']} backend; replay it on an env with backend="
            f"{record['backend']!r}, not {base.config.backend!r}"
        )
    recorded, current = json.loads(record["env_config"]), json.loads(config_json(base))
    keys = recorded.keys() | current.keys()
    different = sorted(k for k in keys if recorded.get(k) != current.get(k))
    if different:
        raise ValueError(
            f"the env's configuration differs from the row's in {different}: "
            + ", ".join(f"{k}={current.get(k)!r} (row: {recorded.get(k)!r})" for k in different)
        )


def _check_policy_fits(policy: Policy, env: gym.Env) -> None:
    if isinstance(policy, GreedyOraclePolicy) and policy.env is not env.unwrapped:
        raise ValueError("the greedy oracle was built for another env; build it for this one")
    if isinstance(policy, BaselinePolicy) and policy.layout.size != env.observation_space.shape[0]:
        raise ValueError(
            f"{policy.name} was built for observations of size {policy.layout.size}, the env "
            f"gives {env.observation_space.shape[0]}"
        )
    if isinstance(policy, BaseAlgorithm):
        check_spaces_match(policy.observation_space, policy.action_space, env)


def _optional(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _nan_if_none(value: Any) -> float:
    return math.nan if value is None else float(value)

"""Leaderboard evaluation: any policy on a fixed list of windows, one CSV row per window.

A policy is a trained SB3 model or a baseline of :mod:`agents.baselines`; both act through
``predict(observation, deterministic=True)`` (MaskablePPO also receives the env's
``action_masks()``). Each row records what the episode measured and everything needed to
recompute it: the executed ranks, the requested ranks and the per-step rewards.
:func:`replay_csv` re-runs every row with :func:`drrl_env.replay.validate` and checks every
column (:data:`REPLAY_CHECKS`), raising :class:`~drrl_env.replay.ReplayMismatch` on a
difference; a column it does not know how to check is an error unless
:data:`INFORMATIONAL_COLUMNS` gives the reason it needs none.

Columns: ``policy``, ``window``, ``backend``, ``return``, ``mean_fidelity``, ``flops_ratio``,
``flops_reduction``, ``mean_perturbation``, ``mean_rank``, ``masked_actions``, ``actions``
and ``requested_actions`` (JSON, segments x layers), ``ranks`` and ``requested_ranks``
(the ranks of those actions), ``rewards`` (JSON, per step), ``kept_fraction`` (keys
attended exactly over causal keys), ``perplexity``, ``perplexity_full``, ``mean_kl`` (mean
token KL of the next-token distributions to exact attention's), ``top1_agreement`` and
``retrieval_correct`` (1.0 or 0.0 on windows that expect an answer, e.g. passkey; empty on
others) (live backend; empty on the cached one) and ``env_config`` (JSON of the
env configuration, cache folder and device left out); a run of :mod:`agents.compare` adds
:data:`RUN_COLUMNS` in its ``per_window.csv``. Replay re-derives every number within the
tolerances of :mod:`drrl_env.replay`: FLOPs, counts and ranks exactly, measured numbers
within the float32 run-to-run spread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from sb3_contrib import MaskablePPO
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.baselines import BaselinePolicy, GreedyOraclePolicy
from agents.factory import ALGO_ATTRIBUTE, POLICY_ATTRIBUTE, check_spaces_match
from drrl_env.episodes import Chooser, play_episode
from drrl_env.replay import (
    EXACT,
    PERPLEXITY_RTOL,
    ReplayMismatch,
    ReplayResult,
    actions_of,
    reward_tolerance,
    validate,
)
from harness.runs import CONFIG_FILE

Policy = BaseAlgorithm | BaselinePolicy


KL_ATOL = 1e-7
"""Absolute tolerance of a replayed mean token KL (nats), beside the perplexity's relative one."""
TOP1_ATOL = 1e-3
"""Absolute tolerance of a replayed top-1 agreement: one token in a thousand."""


class CsvFormatError(ValueError):
    """A leaderboard CSV field does not parse; the message names the data row and column."""


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
    "kept_fraction",
    "masked_actions",
    "actions",
    "requested_actions",
    "ranks",
    "requested_ranks",
    "rewards",
    "perplexity",
    "perplexity_full",
    "mean_kl",
    "top1_agreement",
    "retrieval_correct",
    "env_config",
)
SUMMARY_COLUMNS = (
    "mean_fidelity",
    "flops_ratio",
    "flops_reduction",
    "mean_perturbation",
    "mean_rank",
    "kept_fraction",
)
LIVE_COLUMNS = ("perplexity", "perplexity_full", "mean_kl", "top1_agreement", "retrieval_correct")
"""Measured against exact attention by the live backend (NaN on the cached one;
``retrieval_correct`` is NaN on windows that expect no answer)."""
DERIVED_COLUMNS = ("return", *SUMMARY_COLUMNS, "masked_actions", *LIVE_COLUMNS)
RUN_COLUMNS = ("seed", "kind", "method", "attention_flops_full")
"""Columns :mod:`agents.compare` adds to the leaderboard columns in ``per_window.csv``."""
LABEL_COLUMNS = ("policy", "kind", "seed", "method")
"""Columns that name what a row is (tables group on them); replay checks them too."""
REPLAY_CHECKS: dict[str, str] = {
    "policy": "label: allowed by labels= and a trial or baseline of the run (config.json); "
    "in a run's leaderboard/<method>/<policy>[__<seed>].csv, the file's policy",
    "kind": "label: with policy and seed, a trial (rl) or baseline of the run",
    "seed": "label: with policy and kind, a trial's seed (0 for a baseline) in the run",
    "method": "label: the env's method (and the row's env_config's)",
    "window": "the replayed window; at most one row per policy, kind and seed in a run",
    "backend": "the env's backend",
    "env_config": "the env's configuration (cache folder and device left out)",
    "requested_actions": "replayed: the action mask turns them into the recorded actions",
    "actions": "the actions the replay executes, exactly",
    "ranks": "the executed ranks, exactly",
    "requested_ranks": "the ranks of the requested actions, exactly",
    "keeps": "the executed keep fractions, exactly",
    "requested_keeps": "the keep fractions of the requested actions, exactly",
    "rewards": "per step, within the backend's reward tolerance (drrl_env.replay)",
    **{
        column: "re-derived from the replay within column_tolerance()"
        for column in (*DERIVED_COLUMNS, "attention_flops_full")
    },
}
"""How replay checks each column it knows (:func:`replay_csv`)."""
INFORMATIONAL_COLUMNS: dict[str, str] = {}
"""Columns replay leaves unchecked, each with the reason (e.g. a wall time, which no replay
reproduces). A column in neither this nor :data:`REPLAY_CHECKS` makes replay fail, so a new
column is never silently unchecked."""
_REQUIRED_COLUMNS = ("policy", "window", "backend", "env_config", "rewards")
_FLOAT_COLUMNS = ("return", *SUMMARY_COLUMNS, *LIVE_COLUMNS)
_FLOAT_COLUMNS += ("attention_flops_full",)
_INT_COLUMNS = ("window", "masked_actions", "seed")
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


def actor(policy: Policy) -> Chooser:
    """``policy`` as the chooser of :func:`drrl_env.episodes.play_episode`
    (:func:`predict_action`: deterministic; a MaskablePPO also gets the env's masks)."""
    return lambda observation, env: predict_action(policy, observation, env)


def run_episode(policy: Policy, env: gym.Env, window: int, name: str) -> dict[str, Any]:
    """Play one episode of ``window`` with ``policy`` and return its leaderboard row."""
    trace = play_episode(env, actor(policy), window)
    return _row(name, env, trace.summary, trace.rewards.tolist(), trace.requested.tolist())


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
    numeric = ["return", *SUMMARY_COLUMNS, "masked_actions", *LIVE_COLUMNS]
    table = frame.groupby("policy", sort=False)[numeric].mean()
    return table.sort_values("return", ascending=False)


def write_csv(frame: pd.DataFrame, csv_path: str | Path) -> Path:
    """Write leaderboard rows (floats at full precision; NaN as an empty field)."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def read_csv(csv_path: str | Path) -> pd.DataFrame:
    """Read leaderboard rows back, every float exactly as written (Python's own parser).

    Number columns become floats (an empty field NaN) and ints; JSON columns stay text.

    Raises:
        CsvFormatError: The file is not a CSV, or a number field does not parse (the
            message names the 1-based data row, its policy and window, and the column).
    """
    path = Path(csv_path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CsvFormatError(f"{path}: not a readable CSV ({error})") from None
    places = [_where(row, record) for row, record in enumerate(frame.to_dict("records"), 1)]
    for column in _FLOAT_COLUMNS:
        if column in frame:
            frame[column] = [
                _float_cell(value, column, where)
                for value, where in zip(frame[column], places, strict=True)
            ]
    for column in _INT_COLUMNS:
        if column in frame:
            frame[column] = pd.Series(
                [
                    _int_cell(value, column, where)
                    for value, where in zip(frame[column], places, strict=True)
                ],
                index=frame.index,
                dtype=np.int64,
            )
    return frame


def check_columns(columns: Sequence[str]) -> None:
    """Raise unless replay checks every column (or lists it as informational).

    Raises:
        ValueError: A column is neither in :data:`REPLAY_CHECKS` nor in
            :data:`INFORMATIONAL_COLUMNS` (so a new column cannot go unchecked), or a column
            replay needs is missing.
    """
    unknown = [c for c in columns if c not in REPLAY_CHECKS and c not in INFORMATIONAL_COLUMNS]
    if unknown:
        raise ValueError(
            f"replay does not know how to check the column(s) {unknown}: teach "
            "agents.evaluation.replay_row to check each (REPLAY_CHECKS), or list it in "
            "INFORMATIONAL_COLUMNS with the reason it needs no check"
        )
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if not ({"actions", "requested_actions"} <= set(columns)) and not (
        {"ranks", "requested_ranks"} <= set(columns)
    ):
        missing.append("actions and requested_actions (or ranks and requested_ranks)")
    if missing:
        raise ValueError(f"the CSV lacks the column(s) replay needs: {missing}")


def replay_csv(
    csv_path: str | Path,
    env: gym.Env,
    *,
    labels: Mapping[str, Any] | None = None,
    run_config: str | Path | None = None,
) -> pd.DataFrame:
    """Replay every row of a leaderboard CSV on ``env`` and check every column it holds.

    ``env`` must have the configuration the rows were produced with (backend included:
    the rows' perplexities need the live backend). Each column is checked as
    :data:`REPLAY_CHECKS` says: numbers re-derived within :func:`column_tolerance`, the
    requested actions replayed through the action mask, ranks and keeps exactly, labels
    against the env and the run. A column replay does not know (and that is not in
    :data:`INFORMATIONAL_COLUMNS`) is an error.

    The labels ``policy``, ``kind`` and ``seed`` are checked against ``labels`` and the
    ``config.json`` of the :mod:`agents.compare` run the CSV belongs to: the rows must be
    trials or baselines of the env's method in that run, each window at most once, and a
    per-policy leaderboard file must hold its own policy. ``method`` must be the env's.

    Args:
        csv_path: A leaderboard CSV (:func:`evaluate_policy_on_windows`, ``leaderboard/``
            files and ``per_window.csv`` of a run).
        env: The env to replay on.
        labels: Values the label columns must hold, per column (``policy``, ``kind``,
            ``seed``, ``method``): one value or a collection of allowed values, e.g.
            ``{"policy": ["full_rank", "static_8"]}``.
        run_config: The run's ``config.json`` (or its run folder); by default the
            ``config.json`` of a compare_agents run next to the CSV or up to three folders
            above it (``per_window.csv``, ``leaderboard/<method>/<policy>.csv``).

    Returns:
        The re-derived rows (``policy``, ``window`` and :data:`DERIVED_COLUMNS`).

    Raises:
        CsvFormatError: A field does not parse (the message names the data row and column).
        ValueError: ``env``'s backend or configuration differs from the rows', a column is
            unknown or missing, or a label column has nothing to be checked against
            (neither ``labels`` nor a run's ``config.json``).
        ReplayMismatch: A recorded value is not reproduced (numbers within their
            tolerance, :func:`column_tolerance`), or a label is not the env's or the run's.
    """
    path = Path(csv_path)
    frame = read_csv(path)
    check_columns(list(frame.columns))
    expected = _ExpectedLabels.build(path, list(frame.columns), env.unwrapped, labels, run_config)
    derived = []
    for row, record in enumerate(frame.to_dict("records"), start=1):
        where = _where(row, record)
        expected.check(record, where)
        derived.append(replay_row(record, env, where=where))
    return pd.DataFrame(derived, columns=["policy", "window", *DERIVED_COLUMNS])


def replay_row(
    record: Mapping[str, Any], env: gym.Env, *, where: str | None = None
) -> dict[str, Any]:
    """Replay one leaderboard row and check its values (see :func:`replay_csv`).

    Checks everything one row says about itself: the env, the ``method`` label, the
    schedules, rewards, numbers, ranks and keeps. The other labels need the file's
    context; :func:`replay_csv` checks them.

    Args:
        record: The row, as :func:`read_csv` gives it.
        env: The env to replay on.
        where: How messages name the row (default: its policy and window).
    """
    base = env.unwrapped
    where = where or f"{record.get('policy')} window {record.get('window')}"
    _check_row_env(record, base, where)
    window = _int_value(record, "window", where)
    if not 0 <= window < base.n_windows:
        raise ReplayMismatch(
            f"{where}: window {window} is not a window of the env (0..{base.n_windows - 1})"
        )
    requested, executed = _schedules(record, base, where)
    rewards = _json_cell(record, "rewards", where)
    if not isinstance(rewards, list) or not all(_is_number(r) for r in rewards):
        raise CsvFormatError(f"{where}, column 'rewards': not a list of numbers: {rewards!r:.80}")
    perplexity = _number(record, "perplexity", where) if "perplexity" in record else math.nan
    try:
        result = validate(
            base,
            window,
            requested,
            rewards=rewards,
            perplexity=_optional(perplexity),
            executed=executed,
        )
    except ReplayMismatch as error:
        raise ReplayMismatch(f"{where}: {str(error).removeprefix(f'window {window}: ')}") from None
    derived = _derived(result)
    replayed = dict(derived)
    if "attention_flops_full" in record:
        replayed["attention_flops_full"] = full_attention_flops(base)
    _compare(record, replayed, base.steps, base.bitwise_replay, where)
    _compare_tables(record, result, requested, base, where)
    return {"policy": record["policy"], "window": window, **derived}


def episode_return(rewards: Sequence[float]) -> float:
    """The undiscounted return, summed exactly (independent of summation order)."""
    return math.fsum(rewards)


def full_attention_flops(env: gym.Env) -> float:
    """Exact attention FLOPs of one episode of ``env`` (``attention_flops_full``)."""
    base = env.unwrapped
    return float(base.backend_flops_full_per_layer().sum() * base.n_layers)


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
        **{key: _nan_if_none(summary.get(key)) for key in LIVE_COLUMNS},
        "env_config": config_json(env),
    }


def _derived(result: ReplayResult) -> dict[str, Any]:
    summary = result.summary
    return {
        "return": episode_return(result.rewards.tolist()),
        **{key: float(summary[key]) for key in SUMMARY_COLUMNS},
        "masked_actions": int(summary["masked_actions"]),
        **{key: _nan_if_none(summary.get(key)) for key in LIVE_COLUMNS},
    }


def column_tolerance(column: str, steps: int, bitwise: bool) -> tuple[float, float]:
    """(relative, absolute) tolerance of a replayed column (see :mod:`drrl_env.replay`).

    Counts and FLOPs follow from the actions alone, and every number of a backend that
    replays bit for bit (``bitwise``: ``env.unwrapped.bitwise_replay``, the cached lookups)
    is a lookup: they must replay exactly. Measured live numbers get the float32 run-to-run
    tolerance (summed over the episode for the return).
    """
    if column in ("perplexity", "perplexity_full"):
        return PERPLEXITY_RTOL, 0.0
    if column == "mean_kl":  # a mean of float32 log-prob differences, near 0 when close
        return PERPLEXITY_RTOL, KL_ATOL
    if column == "top1_agreement":  # one token whose top two logits tie may flip
        return 0.0, TOP1_ATOL
    rtol, atol = reward_tolerance(bitwise)
    if column == "return":
        return rtol, atol * steps
    if column in ("mean_fidelity", "mean_perturbation", "kept_fraction"):
        return rtol, atol
    return EXACT, EXACT


def _compare(
    record: Mapping[str, Any], derived: Mapping[str, Any], steps: int, bitwise: bool, where: str
) -> None:
    """The recorded numbers against the replayed ones; ``record``'s backend is the env's
    (:func:`_check_row_env`), whose ``bitwise_replay`` is ``bitwise``."""
    for column, value in derived.items():
        if column not in record:
            continue
        recorded = _number(record, column, where)
        rel, abs_ = column_tolerance(column, steps, bitwise)
        same = (math.isnan(recorded) and math.isnan(value)) or math.isclose(
            recorded, value, rel_tol=rel, abs_tol=abs_
        )
        if not same:
            raise ReplayMismatch(f"{where}: {column} replays as {value!r}, recorded {recorded!r}")


def _compare_tables(
    record: Mapping[str, Any],
    result: ReplayResult,
    requested: np.ndarray,
    base: gym.Env,
    where: str,
) -> None:
    """The recorded ranks and keeps (segments x layers) against the replayed ones, exactly."""
    grid = base.actions
    replayed = {
        "ranks": np.asarray(result.summary["ranks"]),
        "requested_ranks": grid.ranks[requested],
        "keeps": grid.keeps[result.actions],
        "requested_keeps": grid.keeps[requested],
    }
    for column, values in replayed.items():
        if column not in record:
            continue
        cell = _json_cell(record, column, where)
        try:
            recorded = np.asarray(cell, dtype=np.float64)
        except (TypeError, ValueError):
            raise CsvFormatError(
                f"{where}, column {column!r}: not a table of numbers: {cell!r:.80}"
            ) from None
        if recorded.shape != values.shape:
            raise ReplayMismatch(
                f"{where}: {column} has shape {recorded.shape}, the replay {values.shape}"
            )
        different = np.argwhere(recorded != values)
        if different.size:
            segment, layer = (int(i) for i in different[0])
            raise ReplayMismatch(
                f"{where}: {column}[{segment}][{layer}] replays as "
                f"{values[segment, layer].item()!r}, recorded {cell[segment][layer]!r}"
            )


def _schedules(
    record: Mapping[str, Any], base: gym.Env, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(requested, executed) actions (S, L) of a row, checked against the env's grid."""
    if record.get("actions"):
        return (
            _action_table(record, "requested_actions", base, where),
            _action_table(record, "actions", base, where),
        )
    # rows written before actions were recorded: one action per rank
    tables = []
    for column in ("requested_ranks", "ranks"):
        ranks = _table(record, column, base, where)
        try:
            tables.append(actions_of(base, ranks))
        except ValueError:
            raise CsvFormatError(
                f"{where}, column {column!r}: a rank outside the env's grid "
                f"{sorted(set(base.ranks))} or one of several actions: {ranks.tolist()!r:.80}"
            ) from None
    return tables[0], tables[1]


def _action_table(record: Mapping[str, Any], column: str, base: gym.Env, where: str) -> np.ndarray:
    table = _table(record, column, base, where)
    if not ((table >= 0) & (table < len(base.actions))).all():
        raise CsvFormatError(
            f"{where}, column {column!r}: actions must be ints in 0..{len(base.actions) - 1}, "
            f"got {table.tolist()!r:.80}"
        )
    return table


def _table(record: Mapping[str, Any], column: str, base: gym.Env, where: str) -> np.ndarray:
    """An integer table (segments x layers) of a JSON column."""
    cell = _json_cell(record, column, where)
    expected = (base.n_segments, base.n_layers)
    try:
        table = np.asarray(cell)
    except ValueError:
        table = None
    if table is None or table.shape != expected or not np.issubdtype(table.dtype, np.integer):
        raise CsvFormatError(
            f"{where}, column {column!r}: expected a {expected[0]} x {expected[1]} table of "
            f"ints (segments x layers), got {cell!r:.80}"
        )
    return table


def _check_row_env(record: Mapping[str, Any], base: gym.Env, where: str) -> None:
    if record["backend"] != base.config.backend:
        raise ValueError(
            f"the row of {record['policy']} window {record['window']} was produced on the "
            f"{record['backend']} backend; replay it on an env with backend="
            f"{record['backend']!r}, not {base.config.backend!r}"
        )
    recorded, current = _json_cell(record, "env_config", where), json.loads(config_json(base))
    if not isinstance(recorded, dict):
        raise CsvFormatError(f"{where}, column 'env_config': not a JSON object: {recorded!r:.80}")
    keys = recorded.keys() | current.keys()
    different = sorted(k for k in keys if recorded.get(k) != current.get(k))
    if different:
        hint = (
            "; replay the rows of each method on an env of that method (a run's "
            "leaderboard/<method>/ files hold one method each)"
            if "method" in different
            else ""
        )
        raise ValueError(
            f"the env's configuration differs from the row's in {different}: "
            + ", ".join(f"{k}={current.get(k)!r} (row: {recorded.get(k)!r})" for k in different)
            + hint
        )
    if "method" in record and record["method"] != base.config.method:
        raise ReplayMismatch(
            f"{where}: method is {record['method']!r}; the row's env_config and the env say "
            f"{base.config.method!r}"
        )


@dataclass
class _ExpectedLabels:
    """What the label columns of one CSV may hold (see :func:`replay_csv`)."""

    allowed: dict[str, set]
    run_keys: set[tuple[str, str, int]] | None = None
    run_source: str = ""
    file_policy: str | None = None
    file_seed: int | None = None
    seen: set = field(default_factory=set)

    @classmethod
    def build(
        cls,
        path: Path,
        columns: list[str],
        base: gym.Env,
        labels: Mapping[str, Any] | None,
        run_config: str | Path | None,
    ) -> _ExpectedLabels:
        allowed = {}
        for name, value in (labels or {}).items():
            if name not in LABEL_COLUMNS:
                raise ValueError(f"labels: {name!r} is not a label column; labels: {LABEL_COLUMNS}")
            if name not in columns:
                raise ValueError(f"labels: {path.name} has no {name!r} column to check")
            values = set(value) if isinstance(value, list | tuple | set | frozenset) else {value}
            if name == "seed" and not all(_is_number(v) and int(v) == v for v in values):
                raise ValueError(f"labels: seed values must be ints, got {value!r}")
            allowed[name] = values
        expected = cls(allowed)
        config_path = _run_config_path(path, run_config)
        if config_path is not None:
            expected._add_run(path, config_path, base)
        unchecked = [
            name
            for name in ("policy", "kind", "seed")
            if name in columns and name not in allowed and expected.run_keys is None
        ]
        if unchecked:
            raise ValueError(
                f"the label column(s) {unchecked} of {path.name} have nothing to be checked "
                "against: the CSV is not inside a compare_agents run folder (no config.json "
                "with the run's arguments next to it or up to three folders above). Pass "
                "run_config= (the run's config.json) or labels= (the values the rows must "
                f"hold, e.g. labels={{{unchecked[0]!r}: ...}})"
            )
        return expected

    def _add_run(self, path: Path, config_path: Path, base: gym.Env) -> None:
        from agents.compare import planned_keys

        try:
            recorded = json.loads(config_path.read_text())["args"]
            method = base.config.method
            if method not in recorded["methods"]:
                raise ValueError(
                    f"the env's method {method!r} is not one of the run's methods "
                    f"{recorded['methods']} ({config_path})"
                )
            grid = base.config.rank_grid(base.head_dim)
            self.run_keys = planned_keys(recorded, method, grid, base.config.budget is not None)
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{config_path}: no readable compare_agents arguments ({error!r})"
            ) from None
        self.run_source = f"the run's {config_path.name} ({config_path.parent})"
        if path.parent.parent.name == "leaderboard" and path.parents[2] == config_path.parent:
            if path.parent.name != method:
                raise ReplayMismatch(
                    f"{path.name} lies in the leaderboard folder of method {path.parent.name!r}; "
                    f"the env's method is {method!r}"
                )
            policy, _, seed = path.stem.partition("__")
            self.file_policy = policy
            if seed:
                try:
                    self.file_seed = int(seed)
                except ValueError:
                    raise ValueError(f"{path.name}: {seed!r} is not a seed") from None
                if ("rl", policy, self.file_seed) not in self.run_keys:
                    raise ReplayMismatch(
                        f"{path.name}: {policy} seed {seed} is not a trial of method {method!r} "
                        f"in {self.run_source}"
                    )

    def check(self, record: Mapping[str, Any], where: str) -> None:
        """Raise :class:`ReplayMismatch` if a label of ``record`` is not allowed."""
        for name, values in self.allowed.items():
            if record[name] not in values:
                raise ReplayMismatch(
                    f"{where}: {name} is {record[name]!r}; the replay call allows "
                    f"{sorted(values, key=str)}"
                )
        if self.run_keys is None:
            return
        policy, kind, seed = record["policy"], record.get("kind"), record.get("seed")
        if self.file_policy is not None and policy != self.file_policy:
            raise ReplayMismatch(
                f"{where}: policy is {policy!r} in the leaderboard file of {self.file_policy!r}"
            )
        seed = self.file_seed if seed is None else seed
        matches = [
            key
            for key in self.run_keys
            if key[1] == policy and kind in (None, key[0]) and seed in (None, key[2])
        ]
        if not matches:
            label = ", ".join(
                f"{name} {value!r}"
                for name, value in (("kind", kind), ("policy", policy), ("seed", seed))
                if value is not None
            )
            raise ReplayMismatch(
                f"{where}: {label} is not a trial or baseline of this method in "
                f"{self.run_source}; it holds (kind, policy, seed) {sorted(self.run_keys)}"
            )
        key = (kind, policy, seed, record.get("window"))
        if key in self.seen:
            raise ReplayMismatch(
                f"{where}: a second row of {policy} (kind {kind}, seed {seed}) on window "
                f"{record.get('window')}; a run evaluates each policy once per window"
            )
        self.seen.add(key)


def _run_config_path(path: Path, run_config: str | Path | None) -> Path | None:
    if run_config is not None:
        given = Path(run_config)
        config = given / CONFIG_FILE if given.is_dir() else given
        if not config.is_file():
            raise ValueError(f"run_config={str(run_config)!r}: no such file or run folder")
        return config
    for folder in list(path.resolve().parents)[:3]:
        candidate = folder / CONFIG_FILE
        if candidate.is_file() and _is_compare_config(candidate):
            return candidate
    return None


def _is_compare_config(path: Path) -> bool:
    from agents.compare import RUN_ARGS

    try:
        recorded = json.loads(path.read_text()).get("args")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(recorded, dict) and all(name in recorded for name in RUN_ARGS)


def _where(row: int, record: Mapping[str, Any]) -> str:
    """How messages name a data row (1-based, the header not counted)."""
    return f"data row {row} ({record.get('policy')!r}, window {record.get('window')})"


def _json_cell(record: Mapping[str, Any], column: str, where: str) -> Any:
    text = record[column]
    try:
        return json.loads(text)
    except (TypeError, ValueError) as error:
        raise CsvFormatError(
            f"{where}, column {column!r}: not JSON ({error}): {str(text)!r:.80}"
        ) from None


def _float_cell(value: str, column: str, where: str) -> float:
    if value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise CsvFormatError(f"{where}, column {column!r}: {value!r} is not a number") from None


def _int_cell(value: str, column: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CsvFormatError(f"{where}, column {column!r}: {value!r} is not an integer") from None


def _number(record: Mapping[str, Any], column: str, where: str) -> float:
    value = record[column]
    if isinstance(value, str):
        return _float_cell(value, column, where)
    if not _is_number(value):
        raise CsvFormatError(f"{where}, column {column!r}: {value!r} is not a number")
    return float(value)


def _int_value(record: Mapping[str, Any], column: str, where: str) -> int:
    value = record[column]
    if isinstance(value, str):
        return _int_cell(value, column, where)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise CsvFormatError(f"{where}, column {column!r}: {value!r} is not an integer")
    return int(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


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

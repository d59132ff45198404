"""What the notebooks need on top of :mod:`agents.evaluation` and :mod:`harness.reporting`.

- :func:`comparison_frame`: agents and baselines evaluated on the same windows, in the
  per-window form :func:`harness.reporting.summary_table` expects;
- :func:`ranks_per_layer`: the mean executed rank of each layer, per policy;
- :func:`episode_trace`: one episode step by step, guardrail mask included;
- :func:`pareto_image`: :func:`harness.reporting.pareto_plot` as an inline image.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd

from agents.evaluation import Policy, actor, leaderboard
from drrl_env.episodes import play_episode
from harness.reporting import pareto_plot


def comparison_frame(
    env: gym.Env,
    windows: Iterable[int],
    rl: Mapping[str, Policy],
    baselines: Mapping[str, Policy],
    seed: int = 0,
) -> pd.DataFrame:
    """Every policy on the same ``windows`` of ``env``: one row per (policy, window).

    The leaderboard rows of :func:`agents.evaluation.leaderboard` plus the columns
    :func:`harness.reporting.summary_table` groups by: ``kind`` (``rl`` or ``baseline``),
    ``seed``, ``method`` (the env's) and ``attention_flops_full`` (full-rank attention
    FLOPs of one episode).

    Raises:
        ValueError: Neither ``rl`` nor ``baselines`` holds a policy.
    """
    windows = list(windows)
    frames = [
        leaderboard(policies, env, windows).assign(kind=kind, seed=seed)
        for kind, policies in (("rl", rl), ("baseline", baselines))
        if policies
    ]
    if not frames:
        raise ValueError("comparison_frame needs at least one policy")
    base = env.unwrapped
    full = float(base.backend_flops_full_per_layer().sum() * base.n_layers)
    return pd.concat(frames, ignore_index=True).assign(
        method=base.config.method, attention_flops_full=full
    )


def ranks_per_layer(frame: pd.DataFrame, column: str = "ranks") -> pd.DataFrame:
    """Mean rank of each layer per policy (over windows and segments): policies x layers.

    Args:
        frame: Leaderboard rows (their ``ranks`` hold JSON tables of segments x layers).
        column: ``ranks`` (executed) or ``requested_ranks`` (what the policy asked for).
    """
    rows = {}
    for policy, group in frame.groupby("policy", sort=False):
        tables = np.array([json.loads(value) for value in group[column]], dtype=np.float64)
        rows[policy] = tables.mean(axis=(0, 1))  # (windows, S, L) -> (L,)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name, table.columns.name = "policy", "layer"
    return table


def episode_trace(policy: Policy, env: gym.Env, window: int) -> pd.DataFrame:
    """Play one episode of ``window`` and return one row per step.

    Columns: ``step``, ``segment``, ``layer``, ``requested_rank``, ``rank`` (executed),
    ``action_masked``, ``fidelity``, ``flops_ratio``, ``perturbation``, ``reward`` and
    ``mask`` (the guardrail's allowed actions before the step, a bool array).
    """
    trace = play_episode(env, actor(policy), window, record_steps=True)
    rows = [
        {
            "step": step,
            **{key: info[key] for key in ("segment", "layer", "requested_rank", "rank")},
            "action_masked": bool(info["action_masked"]),
            **{key: info[key] for key in ("fidelity", "flops_ratio", "perturbation")},
            "reward": float(reward),
            "mask": info["mask"],
        }
        for step, (info, reward) in enumerate(zip(trace.steps, trace.rewards, strict=True))
    ]
    return pd.DataFrame(rows)


def pareto_image(summary: pd.DataFrame):
    """:func:`harness.reporting.pareto_plot` of ``summary`` as an ``IPython.display.Image``.

    ``pareto_plot`` switches matplotlib to the file-only ``Agg`` backend; the backend in
    use before (e.g. a notebook's inline one) is restored afterwards.
    """
    import matplotlib
    from IPython.display import Image

    backend = matplotlib.get_backend()
    with tempfile.TemporaryDirectory() as folder:
        data = pareto_plot(summary, Path(folder) / "pareto.png").read_bytes()
    matplotlib.use(backend)
    return Image(data=data, format="png")

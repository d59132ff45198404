"""Is the default problem non-trivial? Returns of full rank, static ranks and the greedy oracle.

On the cached backend (teacher-forced lookups) every window of the split is played by
full rank, each static rank, the energy-threshold rule and the greedy one-step oracle.
The problem is worth learning when the greedy choice varies across layers and segments
and beats always-full-rank and the static ranks. Writes ``landscape.csv`` (one row per
policy, appended as each finishes), ``landscape.md`` (generated from the CSV) and
``config.json`` under ``<out_dir>/<run_name>`` (default ``results/reward_landscape``). A
folder holding an earlier run is refused unless ``--overwrite`` (start again) or
``--resume`` (keep the policies it finished, play the rest).

    python experiments/reward_landscape.py                       # DRRL-Wikitext-v0
    python experiments/reward_landscape.py --beta 0.3 --gamma 0  # other reward weights
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from agents import GreedyOraclePolicy, evaluate_policy_on_windows, make_baseline
from drrl_env.envs.config import SPLITS
from harness.reporting import markdown_from_frame, table_columns
from harness.runs import (
    ArgumentError,
    RowLog,
    RunArgs,
    check_minimum,
    registered_id,
    run_main,
)

KEY = ("policy",)
"""The unit of work of ``landscape.csv``: one policy on every window of the split."""
MARKDOWN_COLUMNS = table_columns(
    "policy return mean_fidelity flops_reduction_pct mean_rank distinct_ranks",
    mean_fidelity=("fidelity", "{:.3f}"),
)
"""``(header, landscape.csv column, format)`` of ``landscape.md``."""


@dataclass(frozen=True)
class Args(RunArgs):
    """Returns of full rank, the static ranks, an energy threshold and the greedy oracle."""

    env_id: str = "DRRL-Wikitext-v0"
    """Registered environment id (cached backend)."""
    split: str = "train"
    """Article split of the windows."""
    beta: float | None = None
    """FLOPs weight; None keeps the environment default."""
    gamma: float | None = None
    """Perturbation weight; None keeps the environment default."""
    threads: int | None = None
    """Torch threads; None keeps torch's default."""
    run_name: str = "reward_landscape"
    """Run folder inside out_dir."""

    def __post_init__(self) -> None:
        super().__post_init__()
        registered_id(self.env_id)
        if self.split not in SPLITS:
            raise ArgumentError(f"split: {self.split!r} is not one of {SPLITS}")
        for name in ("beta", "gamma"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ArgumentError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.threads is not None:
            check_minimum(self, ("threads",))


def policies_of(env: gym.Env) -> dict:
    """Name -> policy: full rank, each static rank, an energy threshold, the greedy oracle."""
    policies = {"full_rank": make_baseline("full_rank", env)}
    for rank in env.unwrapped.ranks[:-1]:
        policies[f"static_{rank}"] = make_baseline("static_rank", env, rank=rank)
    policies["energy_0.95"] = make_baseline("energy_threshold", env, tau=0.95)
    policies["greedy_oracle"] = GreedyOraclePolicy(env)
    return policies


def landscape_row(env: gym.Env, name: str, policy) -> dict:
    """One policy's mean return, fidelity, FLOPs reduction and distinct ranks chosen."""
    windows = range(env.unwrapped.n_windows)
    frame = evaluate_policy_on_windows(policy, env, windows, name=name)
    ranks = np.concatenate([np.ravel(json.loads(r)) for r in frame["ranks"]])
    return {
        "policy": name,
        "return": frame["return"].mean(),
        "mean_fidelity": frame["mean_fidelity"].mean(),
        "flops_reduction_pct": 100 * frame["flops_reduction"].mean(),
        "mean_rank": frame["mean_rank"].mean(),
        "distinct_ranks": len(set(ranks.tolist())),
        "windows": len(frame),
    }


def to_markdown(table: pd.DataFrame) -> str:
    """``landscape.md``'s table, from ``landscape.csv`` read back."""
    return markdown_from_frame(table, MARKDOWN_COLUMNS)


def main(args: Args) -> Path:
    """Play every policy the run folder lacks, then write the table."""
    folder = args.run_folder()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    weights = {k: v for k, v in (("beta", args.beta), ("gamma", args.gamma)) if v is not None}
    env = gym.make(args.env_id, backend="cached", split=args.split, device=args.device, **weights)
    config = env.unwrapped.config.as_dict()
    out = folder.prepare(asdict(args), env=config)
    log = RowLog(out / "landscape.csv", KEY)
    done = log.keys()
    policies = policies_of(env)
    for name, policy in policies.items():
        if log.key_of({"policy": name}) not in done:
            log.append([landscape_row(env, name, policy)])
    table = log.sorted_by([{"policy": name} for name in policies])
    log.rewrite(table)
    table = pd.read_csv(out / "landscape.csv")
    header = (
        f"{args.env_id}, split {args.split}, alpha={config['alpha']}, "
        f"beta={config['beta']}, gamma={config['gamma']}, {len(table)} policies, "
        f"{int(table['windows'].iloc[0])} windows (cached backend)\n\n"
    )
    (out / "landscape.md").write_text(header + to_markdown(table))
    print(header + to_markdown(table), end="")
    return out


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

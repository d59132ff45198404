"""Is the default problem non-trivial? Returns of full rank, static ranks and the greedy oracle.

On the cached backend (teacher-forced lookups) every window of the split is played by
full rank, each static rank, the energy-threshold rule and the greedy one-step oracle.
The problem is worth learning when the greedy choice varies across layers and segments
and beats always-full-rank and the static ranks. Writes ``landscape.csv`` and
``landscape.md`` (generated from the CSV) under ``out_dir``.

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


@dataclass(frozen=True)
class Args:
    env_id: str = "DRRL-Wikitext-v0"
    """Registered environment id (cached backend)."""
    split: str = "train"
    """Article split of the windows."""
    beta: float | None = None
    """FLOPs weight; None keeps the environment default."""
    gamma: float | None = None
    """Perturbation weight; None keeps the environment default."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device of the model when the cache has to be built (cuda when present)."""
    out_dir: str = "results/reward_landscape"
    """Output folder."""


def landscape(env: gym.Env) -> pd.DataFrame:
    """Per policy: mean return, fidelity, FLOPs reduction, distinct ranks chosen."""
    windows = range(env.unwrapped.n_windows)
    policies = {"full_rank": make_baseline("full_rank", env)}
    for rank in env.unwrapped.ranks[:-1]:
        policies[f"static_{rank}"] = make_baseline("static_rank", env, rank=rank)
    policies["energy_0.95"] = make_baseline("energy_threshold", env, tau=0.95)
    policies["greedy_oracle"] = GreedyOraclePolicy(env)
    rows = []
    for name, policy in policies.items():
        frame = evaluate_policy_on_windows(policy, env, windows, name=name)
        ranks = np.concatenate([np.ravel(json.loads(r)) for r in frame["ranks"]])
        rows.append(
            {
                "policy": name,
                "return": frame["return"].mean(),
                "mean_fidelity": frame["mean_fidelity"].mean(),
                "flops_reduction_pct": 100 * frame["flops_reduction"].mean(),
                "mean_rank": frame["mean_rank"].mean(),
                "distinct_ranks": len(set(ranks.tolist())),
                "windows": len(frame),
            }
        )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| policy | return | fidelity | FLOPs reduction | mean rank | distinct ranks |",
        "|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        lines.append(
            f"| {row['policy']} | {row['return']:.2f} | {row['mean_fidelity']:.3f} "
            f"| {row['flops_reduction_pct']:.1f} % | {row['mean_rank']:.1f} "
            f"| {row['distinct_ranks']} |"
        )
    return "\n".join(lines)


def main(args: Args) -> pd.DataFrame:
    weights = {k: v for k, v in (("beta", args.beta), ("gamma", args.gamma)) if v is not None}
    env = gym.make(args.env_id, backend="cached", split=args.split, device=args.device, **weights)
    table = landscape(env)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "landscape.csv", index=False)
    config = env.unwrapped.config.as_dict()
    header = (
        f"{args.env_id}, split {args.split}, alpha={config['alpha']}, "
        f"beta={config['beta']}, gamma={config['gamma']}, {len(table)} policies, "
        f"{int(table['windows'].iloc[0])} windows (cached backend)\n\n"
    )
    (out / "landscape.md").write_text(header + to_markdown(table) + "\n")
    (out / "config.json").write_text(json.dumps({"args": asdict(args), "env": config}, indent=2))
    print(header + to_markdown(table))
    return table


if __name__ == "__main__":
    main(tyro.cli(Args))

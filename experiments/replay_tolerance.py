"""Run-to-run spread of live numbers across thread counts: where the replay tolerances come from.

The same schedules of the same windows run live with each torch thread count; the float32
kernels sum in another order with another number of threads. Reported: the largest relative
and absolute difference of the per-step rewards and of the perplexity between any two
thread counts, next to the tolerances of :mod:`drrl_env.replay` they must stay within.
Writes ``spread.csv`` and ``spread.md`` under ``out_dir``.

    python experiments/replay_tolerance.py                     # SmolLM2, topk and gram
    python experiments/replay_tolerance.py --env-ids DRRL-Tiny-Live-v0 --schedules 2
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from drrl_env.replay import PERPLEXITY_RTOL, REWARD_ATOL, REWARD_RTOL, replay


@dataclass(frozen=True)
class Args:
    """Spread of live rewards and perplexity across torch thread counts."""

    env_ids: tuple[str, ...] = ("DRRL-Wikitext-TopK-Live-v0", "DRRL-Wikitext-Live-v0")
    """Live ids measured."""
    threads: tuple[int, ...] = (1, 2)
    """Torch thread counts compared."""
    schedules: int = 3
    """Random schedules per id (window 0 of the eval split), plus exact attention."""
    seed: int = 0
    """Seed of the schedules."""
    out_dir: Path = Path("results/replay_tolerance")
    """Where spread.csv and spread.md are written."""


def spread(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(largest relative, largest absolute) difference of two arrays."""
    absolute = np.abs(a - b)
    relative = absolute / np.maximum(np.abs(b), 1e-300)
    return float(relative.max()), float(absolute.max())


def measure(args: Args, env_id: str) -> list[dict]:
    """Rows of one id: every schedule at every thread count, then the spreads."""
    env = gym.make(env_id, split="eval", max_windows=1).unwrapped
    rng = np.random.default_rng(args.seed)
    shape = (env.n_segments, env.n_layers)
    plans = [np.full(shape, env.actions.full_action)]
    plans += [rng.integers(0, len(env.actions), size=shape) for _ in range(args.schedules)]
    runs: dict[int, list] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs[threads] = [replay(env, 0, plan) for plan in plans]
    rows = []
    for first, second in itertools.combinations(args.threads, 2):
        for index, (a, b) in enumerate(zip(runs[first], runs[second], strict=True)):
            reward_rel, reward_abs = spread(a.rewards, b.rewards)
            ppl_rel, _ = spread(np.array([a.perplexity]), np.array([b.perplexity]))
            rows.append(
                {
                    "env_id": env_id,
                    "threads": f"{first} vs {second}",
                    "schedule": "exact" if index == 0 else f"random_{index}",
                    "reward_max_rel": reward_rel,
                    "reward_max_abs": reward_abs,
                    "perplexity_rel": ppl_rel,
                    "within": bool(
                        np.allclose(a.rewards, b.rewards, rtol=REWARD_RTOL, atol=REWARD_ATOL)
                        and ppl_rel <= PERPLEXITY_RTOL
                    ),
                }
            )
    env.close()
    return rows


def main(args: Args) -> Path:
    started = time.perf_counter()
    rows = [row for env_id in args.env_ids for row in measure(args, env_id)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out_dir / "spread.csv", index=False)
    table = pd.read_csv(args.out_dir / "spread.csv")
    lines = [
        f"Live runs of the same schedules with torch threads {args.threads} "
        f"({time.perf_counter() - started:.0f} s); tolerances of drrl_env.replay: reward "
        f"rtol {REWARD_RTOL:g} / atol {REWARD_ATOL:g}, perplexity rtol {PERPLEXITY_RTOL:g}.",
        "",
        "| env | threads | schedule | reward max rel | reward max abs | perplexity rel |",
        "|---|---|---|---|---|---|",
    ]
    for row in table.to_dict("records"):
        lines.append(
            f"| {row['env_id']} | {row['threads']} | {row['schedule']} | "
            f"{row['reward_max_rel']:.2e} | {row['reward_max_abs']:.2e} | "
            f"{row['perplexity_rel']:.2e} |"
        )
    within = bool(table["within"].all())
    lines += ["", f"Every spread within the tolerances: {'yes' if within else 'NO'}."]
    (args.out_dir / "spread.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return args.out_dir / "spread.csv"


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Run-to-run spread of live numbers across thread counts: where the replay tolerances come from.

The same schedules of the same windows run live with each torch thread count; the float32
kernels sum in another order with another number of threads. Reported: the largest relative
and absolute difference of the per-step rewards and of the perplexity between any two
thread counts, next to the tolerances of :mod:`drrl_env.replay` they must stay within.
Writes ``spread.csv`` (each id's rows appended as it finishes), ``spread.md`` and
``config.json`` under ``<out_dir>/<run_name>`` (default ``results/replay_tolerance``). A
folder holding an earlier run is refused unless ``--overwrite`` (start again) or
``--resume`` (keep the ids it finished, measure the rest).

    python experiments/replay_tolerance.py                     # SmolLM2, topk and gram
    python experiments/replay_tolerance.py --env-ids DRRL-Tiny-Live-v0 --schedules 2
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from drrl_env.replay import PERPLEXITY_RTOL, REWARD_ATOL, REWARD_RTOL, replay
from harness.reporting import markdown_from_frame, table_columns
from harness.runs import (
    RESULT_FREE,
    ArgumentError,
    RowLog,
    RunArgs,
    check_minimum,
    check_seeds,
    check_unique,
    registered_id,
    run_main,
)

KEY = ("env_id",)
"""The unit of work of ``spread.csv``: one id, every schedule at every thread count."""
MARKDOWN_COLUMNS = table_columns(
    "env_id threads schedule reward_max_rel reward_max_abs perplexity_rel",
    schedule=("schedule", "{}"),
)
"""``(header, spread.csv column, format)`` of ``spread.md``."""


@dataclass(frozen=True)
class Args(RunArgs):
    """Spread of live rewards and perplexity across torch thread counts."""

    env_ids: tuple[str, ...] = ("DRRL-Wikitext-TopK-Live-v0", "DRRL-Wikitext-Live-v0")
    """Live ids measured."""
    threads: tuple[int, ...] = (1, 2)
    """Torch thread counts compared (at least two)."""
    schedules: int = 3
    """Random schedules per id (window 0 of the eval split), plus exact attention."""
    seed: int = 0
    """Seed of the schedules."""
    device: str = "cpu"
    """Torch device of the model (the thread counts are those of the CPU kernels)."""
    run_name: str = "replay_tolerance"
    """Run folder inside out_dir."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.env_ids:
            raise ArgumentError("env_ids must name at least one id")
        check_unique("env_ids", self.env_ids)
        for env_id in self.env_ids:
            if registered_id(env_id).get("backend", "cached") != "live":
                raise ArgumentError(f"env_ids: {env_id!r} is not a live id")
        if len(set(self.threads)) < 2 or min(self.threads) < 1:
            raise ArgumentError(f"threads must be at least two counts >= 1, got {self.threads}")
        check_unique("threads", self.threads)
        check_minimum(self, ("schedules",), low=0)
        check_seeds("seed", (self.seed,))


def spread(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(largest relative, largest absolute) difference of two arrays."""
    absolute = np.abs(a - b)
    relative = absolute / np.maximum(np.abs(b), 1e-300)
    return float(relative.max()), float(absolute.max())


def measure(args: Args, env_id: str) -> list[dict]:
    """Rows of one id: every schedule at every thread count, then the spreads."""
    env = gym.make(env_id, split="eval", max_windows=1, device=args.device).unwrapped
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
    """Measure every id the run folder lacks, then write the table."""
    # The thread counts are what this script compares: they change its results.
    folder = args.run_folder(ignored=tuple(name for name in RESULT_FREE if name != "threads"))
    out = folder.prepare(asdict(args), torch=torch.__version__)
    log = RowLog(out / "spread.csv", KEY)
    done = log.keys()
    seconds = json.loads(folder.config_path.read_text()).get("measure_s", {})
    for env_id in args.env_ids:
        if log.key_of({"env_id": env_id}) in done:
            continue
        started = time.perf_counter()
        rows = measure(args, env_id)
        seconds[env_id] = time.perf_counter() - started
        log.append(rows)
        folder.update_config(measure_s=seconds)
    log.rewrite(log.sorted_by([{"env_id": env_id} for env_id in args.env_ids]))
    table = pd.read_csv(out / "spread.csv")
    within = bool(table["within"].all())
    text = (
        f"Live runs of the same schedules with torch threads {args.threads} "
        f"({sum(seconds.values()):.0f} s); tolerances of drrl_env.replay: reward "
        f"rtol {REWARD_RTOL:g} / atol {REWARD_ATOL:g}, perplexity rtol {PERPLEXITY_RTOL:g}.\n\n"
        + markdown_from_frame(table, MARKDOWN_COLUMNS)
        + f"\nEvery spread within the tolerances: {'yes' if within else 'NO'}.\n"
    )
    (out / "spread.md").write_text(text)
    print(text, end="")
    return out / "spread.csv"


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

"""Agreement of two rollout caches of one configuration, e.g. one built on a GPU, one on a CPU.

A rollout cache is keyed on the model, the text, the method and the action grid, not on the
device or thread count that built it: a cache built on a GPU in minutes is read by CPU runs
as it is. Float kernels differ between devices, so its numbers differ from a CPU build in
the last digits. This benchmark measures by how much, window by window, and whether it
matters for what the cache is used for:

- ``arrays``: for every cached array of every window both caches hold (the raw terms
  ``cosine``, ``dnll_taylor`` and ``dnll_fisher``, the realised ``flops`` and ``kept`` of
  input-dependent methods, the observation's ``spectra`` and ``input_stats``, the exact
  loss), the largest absolute difference and that difference relative to the largest
  magnitude of the array. The token ids must be identical (else the caches hold different
  text and the comparison stops);
- ``optimum``: at each ``--budgets`` value, the per-window optimum
  (:func:`agents.allocations.per_window_optimum`, the exact knapsack on the window's own
  cached values and costs) computed from each cache: how many of its actions differ, and
  how much fidelity the other cache's optimum loses when scored on this cache's values
  (0 when both pick the same actions).

Only windows cached in both folders are compared (the first ``n``, ``n`` the longest run of
windows both hold from window 0); nothing is built, so a missing configuration is an error
that says so. Writes ``arrays.csv``, ``optimum.csv``, ``cache_agreement.md`` and
``config.json`` in ``<out_dir>/<run_name>`` (``results/benchmarks/cache_agreement``).

    python -m drrl_env.build_cache DRRL-Tiny-TopP-v0 --max-windows 4 --cache-dir other
    python benchmarks/cache_agreement.py --env-id DRRL-Tiny-TopP-v0 --split train \\
        --other-cache-dir other
    python benchmarks/cache_agreement.py --env-id DRRL-Long-Mix-TopP-v0 --split eval \\
        --set "corpus='passkey:needles=2'" --other-cache-dir cuda-cache --budgets 0.3 0.2
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import pandas as pd
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from agents.allocations import measurements, per_window_optimum
from drrl_env.build_cache import cached_windows, parse_overrides
from drrl_env.inspect import env_config
from harness.reporting import markdown_from_frame
from harness.runs import ArgumentError, BenchmarkArgs, check_budgets, registered_id, run_main

ARRAYS = ("cosine", "dnll_taylor", "dnll_fisher", "flops", "kept", "spectra", "input_stats")
ARRAYS += ("nll_full", "mean_nll")
"""The arrays compared (``flops`` and ``kept`` where the method's costs depend on the input)."""


@dataclass(frozen=True)
class Args(BenchmarkArgs):
    """Compare two rollout caches of one configuration, window by window."""

    other_cache_dir: str = ""
    """Cache root of the second cache (required), e.g. a copy of one built on a GPU."""
    cache_dir: str | None = None
    """Cache root of the first cache (default ``$DRRL_CACHE_DIR`` or the user cache)."""
    env_id: str = "DRRL-Tiny-TopP-v0"
    """Registered cached id whose configuration both caches hold."""
    split: Literal["train", "eval"] = "eval"
    """Split of the windows compared."""
    set: tuple[str, ...] = ()
    """Further gym.make keywords as key=value, as ``python -m drrl_env.build_cache`` takes."""
    max_windows: int | None = None
    """Compare at most this many windows (the first ones both caches hold)."""
    budgets: tuple[float, ...] = (0.5, 0.3)
    """Budgets (fraction of exact attention FLOPs) of the per-window optimum's comparison."""
    run_name: str = "cache_agreement"
    """Run folder inside out_dir."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.other_cache_dir:
            raise ArgumentError("--other-cache-dir is required: the cache compared with the first")
        if self.max_windows is not None and self.max_windows < 1:
            raise ArgumentError(f"max_windows must be >= 1, got {self.max_windows}")
        check_budgets(self.budgets)
        registered_id(self.env_id, cached=True)

    def env_kwargs(self, cache_dir: str | None) -> dict:
        """The ``gym.make`` keywords of one cache: no budget wall, no guardrail."""
        kwargs = {**parse_overrides(self.set), "split": self.split}
        kwargs.update(budget=None, max_perturbation=1.0)
        return kwargs if cache_dir is None else {**kwargs, "cache_dir": cache_dir}


def windows_of(args: Args, cache_dir: str | None) -> list[int]:
    """The windows of the configuration cached under ``cache_dir`` (None: the default root).

    Raises:
        ArgumentError: A bad configuration, or the folder holds no window of it.
    """
    try:
        config = env_config(args.env_id, **args.env_kwargs(cache_dir))
    except (TypeError, ValueError) as error:
        raise ArgumentError(str(error)) from None
    windows, folder = cached_windows(config)
    if not windows:
        root = cache_dir if cache_dir is not None else "the default cache"
        raise ArgumentError(
            f"{root} holds no rollouts of {args.env_id} ({args.split}, "
            f"{', '.join(args.set) or 'its own settings'}): no window in {folder}"
        )
    return windows


def shared_prefix(first: list[int], second: list[int], limit: int | None) -> int:
    """How many windows from window 0 on both lists hold (at most ``limit``)."""
    both, count = set(first) & set(second), 0
    while count in both and (limit is None or count < limit):
        count += 1
    return count


def array_agreement(name: str, first: np.ndarray, second: np.ndarray) -> dict:
    """The largest absolute difference of two arrays, and relative to the first's magnitude.

    Raises:
        ValueError: The shapes differ.
    """
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if first.shape != second.shape:
        raise ValueError(f"{name}: shapes {first.shape} and {second.shape} differ")
    difference = float(np.max(np.abs(first - second))) if first.size else 0.0
    scale = float(np.max(np.abs(first))) if first.size else 0.0
    return {
        "array": name,
        "max_abs_diff": difference,
        "max_abs_value": scale,
        "relative": difference / scale if scale > 0 else (0.0 if difference == 0 else np.inf),
    }


def optimum_agreement(
    values: tuple[np.ndarray, np.ndarray], costs: tuple[np.ndarray, np.ndarray], budget: float
) -> dict:
    """The per-window optimum from each cache's (S, L, A) values and costs: differing actions,
    and the fidelity each loses when the other's optimum is scored on its values."""
    chosen = [per_window_optimum(v, c, budget) for v, c in zip(values, costs, strict=True)]

    def total(table: np.ndarray, actions: np.ndarray) -> float:
        return float(np.take_along_axis(table, actions[..., None], -1).sum())

    loss = [
        total(v, mine) - total(v, theirs)
        for v, mine, theirs in zip(values, chosen, chosen[::-1], strict=True)
    ]
    return {
        "budget": budget,
        "actions": chosen[0].size,
        "differing_actions": int((chosen[0] != chosen[1]).sum()),
        "value_loss_first": loss[0],
        "value_loss_other": loss[1],
        "value_first": total(values[0], chosen[0]),
    }


def compare(args: Args) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(array rows, optimum rows, windows compared) of the two caches."""
    first = windows_of(args, args.cache_dir)
    second = windows_of(args, args.other_cache_dir)
    count = shared_prefix(first, second, args.max_windows)
    if count == 0:
        raise ArgumentError(
            f"the caches hold no common windows from window 0 on (first: {first}, other: {second})"
        )
    envs = [
        gym.make(args.env_id, **args.env_kwargs(root), max_windows=count)
        for root in (args.cache_dir, args.other_cache_dir)
    ]
    try:
        bases = [env.unwrapped for env in envs]
        (values_a, costs_a), (values_b, costs_b) = (measurements(env) for env in envs)
        array_rows, optimum_rows = [], []
        for window in range(count):
            tokens = [base.rollout("tokens", window) for base in bases]
            if not np.array_equal(*tokens):
                raise ArgumentError(
                    f"window {window} holds different token ids in the two caches: they are "
                    "not of one configuration (were they built from other data?)"
                )
            for name in ARRAYS:
                try:
                    pair = [base.rollout(name, window) for base in bases]
                except KeyError:  # flops and kept: input-dependent costs only
                    continue
                array_rows.append({"window": window, **array_agreement(name, *pair)})
            for budget in args.budgets:
                pairs = (values_a[window], values_b[window]), (costs_a[window], costs_b[window])
                try:
                    row = optimum_agreement(*pairs, budget)
                except ValueError as error:  # a budget below the window's cheapest schedule
                    raise ArgumentError(f"budget {budget:g}, window {window}: {error}") from None
                optimum_rows.append({"window": window, **row})
    finally:
        for env in envs:
            env.close()
    return pd.DataFrame(array_rows), pd.DataFrame(optimum_rows), count


def summary_markdown(arrays: pd.DataFrame, optimum: pd.DataFrame, count: int) -> str:
    """Per array the worst window; per budget the windows whose optimum agrees."""
    worst = (
        arrays.sort_values("relative", ascending=False)
        .groupby("array", sort=False)
        .head(1)
        .sort_values("array")
    )
    budgets = (
        optimum.groupby("budget", sort=False)
        .agg(
            windows=("window", "size"),
            same=("differing_actions", lambda d: int((d == 0).sum())),
            differing=("differing_actions", "sum"),
            actions=("actions", "sum"),
            loss=("value_loss_first", "max"),
            loss_other=("value_loss_other", "max"),
        )
        .reset_index()
    )
    text = f"{count} windows compared.\n\n"
    text += markdown_from_frame(
        worst,
        [
            ("array", "array", "{}"),
            ("worst window", "window", "{:.0f}"),
            ("max abs difference", "max_abs_diff", "{:.2e}"),
            ("max abs value", "max_abs_value", "{:.3g}"),
            ("relative", "relative", "{:.2e}"),
        ],
    )
    text += "\n" + markdown_from_frame(
        budgets,
        [
            ("budget", "budget", "{:g}"),
            ("windows", "windows", "{:.0f}"),
            ("same optimum", "same", "{:.0f}"),
            ("differing actions", "differing", "{:.0f}"),
            ("of actions", "actions", "{:.0f}"),
            ("max fidelity lost (first)", "loss", "{:.2e}"),
            ("max fidelity lost (other)", "loss_other", "{:.2e}"),
        ],
    )
    return text


def main(args: Args) -> Path:
    """Compare the caches, write the tables, print the summary."""
    folder = args.run_folder()
    started = time.perf_counter()
    arrays, optimum, count = compare(args)
    out = folder.prepare(asdict(args))
    arrays.to_csv(out / "arrays.csv", index=False)
    optimum.to_csv(out / "optimum.csv", index=False)
    markdown = summary_markdown(
        pd.read_csv(out / "arrays.csv"), pd.read_csv(out / "optimum.csv"), count
    )
    (out / "cache_agreement.md").write_text(markdown)
    folder.update_config(wall_s=time.perf_counter() - started, windows=count)
    print(markdown)
    return out


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

"""Environment throughput, side by side in one run: vectorized copies, memory, live cost.

Sections (``--sections``, all by default):

- ``single``: steps per second of one cached env made with ``gym.make`` and stepped in a
  plain loop (random actions, ``reset`` at each episode end), the way a training script
  without vectorization uses it;
- ``vector``: steps per second of the cached backend with 1, 2 and 4 copies, through
  ``gymnasium.make_vec`` with ``sync`` and ``async`` vectorization (random actions; the
  rate counts the steps of all copies);
- ``memory``: memory of N async copies against one: the unique (USS) and proportional
  (PSS) set size of each worker process (psutil). The cached arrays are memory-mapped, so
  their pages are shared between copies: PSS divides them among the processes that map
  them, USS leaves them out;
- ``live``: one live episode of each method at exact attention and at its cheapest
  action (and at ``--live-settings``), against one plain SDPA forward of the same window
  (the model's own ``sdpa`` attention, no environment): the cost of running the
  environment closed loop. Each window's first episode also runs one exact pass for the
  KL reference; the warm-up episode pays it, the timed ones do not.

Writes ``env_steps.csv``, ``env_steps.md`` and ``config.json`` in the run folder
``<out_dir>/<run_name>`` (``results/benchmarks/env_steps`` by default) and prints the table.
A folder that holds a run is refused unless ``--overwrite`` is given.

    python benchmarks/env_steps.py                                  # DRRL-Wikitext ids
    python benchmarks/env_steps.py --env-id DRRL-Tiny-v0 --live-methods calibrated topk
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from harness.runs import ArgumentError, BenchmarkArgs, run_main

COLUMNS = ("section", "setup", "copies", "value", "unit", "note")
SECTIONS = ("single", "vector", "memory", "live")


@dataclass(frozen=True)
class Args(BenchmarkArgs):
    """Throughput and memory of the environment; cost of a live episode."""

    env_id: str = "DRRL-Wikitext-v0"
    """Registered id of the cached sections (its cache is built first if missing)."""
    sections: tuple[str, ...] = SECTIONS
    """Which measurements to run."""
    copies: tuple[int, ...] = (1, 2, 4)
    """Numbers of environment copies of the vector and memory sections."""
    steps: int = 20_000
    """Steps per copy timed in the vector section."""
    live_methods: tuple[str, ...] = ("gram", "calibrated", "topk")
    """Methods of the live section."""
    live_settings: tuple[str, ...] = ()
    """More actions timed in the live section, by label (e.g. ``r16k0.95``), for every
    method whose grid has them."""
    live_repeats: int = 2
    """Episodes timed per method and action (the median is reported)."""
    max_windows: int = 8
    """Windows of the cached env (built if missing)."""
    threads: int = 1
    """Torch threads (the live section runs the model)."""
    seed: int = 0
    """Seed of the random actions."""
    run_name: str = "env_steps"
    """Run folder inside out_dir."""

    def __post_init__(self) -> None:
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ArgumentError(
                f"unknown sections {sorted(unknown)}; sections: {', '.join(SECTIONS)}"
            )
        super().__post_init__()


def make_vector(args: Args, copies: int, mode: str):
    """``copies`` cached envs through gymnasium's vector API."""
    return gym.make_vec(
        args.env_id,
        num_envs=copies,
        vectorization_mode=mode,
        max_windows=args.max_windows,
        device=args.device,
    )


def vector_rate(args: Args, copies: int, mode: str) -> float:
    """Steps per second of all copies together (autoreset handles episode ends)."""
    vector = make_vector(args, copies, mode)
    try:
        rng = np.random.default_rng(args.seed)
        actions = rng.integers(0, vector.single_action_space.n, size=(args.steps, copies))
        vector.reset(seed=args.seed)
        start = time.perf_counter()
        for action in actions:
            vector.step(action)
        return args.steps * copies / (time.perf_counter() - start)
    finally:
        vector.close()


def single_rate(args: Args) -> float:
    """Steps per second of one env from ``gym.make`` stepped in a plain loop."""
    env = gym.make(args.env_id, max_windows=args.max_windows, device=args.device)
    try:
        rng = np.random.default_rng(args.seed)
        actions = rng.integers(0, env.action_space.n, size=args.steps).tolist()
        env.reset(seed=args.seed)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return args.steps / (time.perf_counter() - start)
    finally:
        env.close()


def worker_memory(args: Args, copies: int) -> tuple[float, float]:
    """Mean USS and total PSS (MiB) of the worker processes of ``copies`` async envs."""
    import psutil

    vector = make_vector(args, copies, "async")
    try:
        vector.reset(seed=args.seed)
        for _ in range(200):  # touch the cached arrays of a few episodes
            vector.step(np.zeros(copies, dtype=np.int64))
        workers = [psutil.Process(p.pid) for p in vector.processes]
        info = [worker.memory_full_info() for worker in workers]
        return float(np.mean([i.uss for i in info])) / 2**20, sum(i.pss for i in info) / 2**20
    finally:
        vector.close()


def timed_episode(env: gym.Env, action: int) -> float:
    """Seconds of one episode of window 0 with the same action at every step."""
    env.reset(options={"window": 0})
    start = time.perf_counter()
    done = False
    while not done:
        _, _, done, _, _ = env.step(action)
    return time.perf_counter() - start


def sdpa_forward(env: gym.Env, repeats: int) -> float:
    """Median seconds of one plain forward of window 0 with the model's own SDPA attention.

    The model is the process's shared instance for the env's configuration
    (:func:`~drrl_env.lm.facts.shared_model`, as
    :func:`drrl_env.inspect.attention_shape` loads it): the very model the live env runs.
    """
    from drrl_env.lm.attention import ATTENTION_NAME
    from drrl_env.lm.facts import shared_model

    base = env.unwrapped
    lm = shared_model(base.config.model, base.config.device, base.config.cache_dir)
    model = lm.model
    ids = torch.as_tensor(base.tokens[0])[None].to(lm.device)
    seconds = []
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            model(input_ids=ids)  # warm
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=ids)
                seconds.append(time.perf_counter() - start)
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
    return float(np.median(seconds))


def live_rows(args: Args) -> list[dict]:
    """Live episodes per method at exact attention and at the cheapest action, vs SDPA."""
    rows, sdpa = [], None
    for method in args.live_methods:
        env = gym.make(
            args.env_id,
            backend="live",
            split="eval",
            max_windows=1,
            method=method,
            device=args.device,
        )
        if sdpa is None:
            sdpa = sdpa_forward(env, args.live_repeats)
            rows.append(row("live", "plain SDPA forward of the window", 1, sdpa, "s"))
        base = env.unwrapped
        cheapest = int(np.argmin(base.costs.executed.sum(axis=0)))
        timed = [("exact", base.actions.full_action), ("cheapest", cheapest)]
        labels = base.actions.labels()
        timed += [("setting", labels.index(x)) for x in args.live_settings if x in labels]
        for label, action in timed:
            timed_episode(env, action)  # warm
            seconds = float(
                np.median([timed_episode(env, action) for _ in range(args.live_repeats)])
            )
            setting = base.actions.settings[action].label()
            rows.append(row("live", f"{method} episode, {label} ({setting})", 1, seconds, "s"))
            rows.append(
                row("live", f"{method} episode, {label} / SDPA forward", 1, seconds / sdpa, "x")
            )
        env.close()
    return rows


def row(section: str, setup: str, copies: int, value: float, unit: str, note: str = "") -> dict:
    return {
        "section": section,
        "setup": setup,
        "copies": copies,
        "value": value,
        "unit": unit,
        "note": note,
    }


def markdown(table: pd.DataFrame) -> str:
    lines = ["| section | setup | copies | value | unit |", "|---|---|---|---|---|"]
    for entry in table.to_dict("records"):
        value = entry["value"]
        shown = "–" if isinstance(value, float) and math.isnan(value) else f"{value:,.3g}"
        if entry["unit"] == "steps/s":
            shown = f"{value:,.0f}"
        lines.append(
            f"| {entry['section']} | {entry['setup']} | {entry['copies']} | {shown} | "
            f"{entry['unit']} |"
        )
    return "\n".join(lines) + "\n"


def main(args: Args) -> Path:
    """Run the sections, write the CSV and the Markdown."""
    folder = args.run_folder()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if set(args.sections) - {"live"}:  # the cached sections need the rollout cache first
        gym.make(args.env_id, max_windows=args.max_windows, device=args.device).close()
    rows = []
    if "single" in args.sections:
        rows.append(row("single", "cached, gym.make, plain loop", 1, single_rate(args), "steps/s"))
    if "vector" in args.sections:
        for mode in ("sync", "async"):
            for copies in args.copies:
                rate = vector_rate(args, copies, mode)
                rows.append(row("vector", f"cached, {mode}", copies, rate, "steps/s"))
    if "memory" in args.sections:
        for copies in args.copies:
            uss, pss = worker_memory(args, copies)
            rows.append(row("memory", "async worker, unique (USS) each", copies, uss, "MiB"))
            rows.append(
                row("memory", "async workers, proportional (PSS) total", copies, pss, "MiB")
            )
    if "live" in args.sections:
        rows += live_rows(args)
    out = folder.prepare(asdict(args), torch=torch.__version__)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.to_csv(out / "env_steps.csv", index=False)
    header = (
        f"{args.env_id}, {args.threads} torch thread(s), device {args.device}, torch "
        f"{torch.__version__}; {args.steps:,} steps per copy in the vector section; "
        f"{time.perf_counter() - started:.0f} s in all.\n\n"
    )
    text = header + markdown(pd.read_csv(out / "env_steps.csv"))
    (out / "env_steps.md").write_text(text)
    folder.update_config(wall_s=time.perf_counter() - started)
    print(text)
    return out / "env_steps.csv"


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

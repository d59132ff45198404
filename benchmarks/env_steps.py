"""Steps per second of the raw environment (no agent), cached vs live backend, one run.

Also times building the cached rollouts when they are not on disk yet.

    python benchmarks/env_steps.py                      # the default DRRL-Wikitext-v0
    python benchmarks/env_steps.py --env-id DRRL-Tiny-v0
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from drrl_env.envs.backends.cached import RolloutCache
from drrl_env.envs.config import EnvConfig


@dataclass(frozen=True)
class Args:
    env_id: str = "DRRL-Wikitext-v0"
    """Registered environment id."""
    cached_steps: int = 200_000
    """Steps timed on the cached backend."""
    live_episodes: int = 1
    """Episodes timed on the live backend."""
    threads: int = 1
    """Torch threads (the live backend runs the model)."""
    seed: int = 0
    """Seed of the random actions."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device of the model (cuda when present, else cpu)."""


def steps_per_second(env: gym.Env, steps: int, seed: int) -> tuple[float, int]:
    """Random actions for ``steps`` steps (resetting at episode ends); (steps/s, steps)."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, env.action_space.n, size=steps)
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(int(action))
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start), steps


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = EnvConfig(**{**gym.spec(args.env_id).kwargs, "backend": "cached"})
    built = RolloutCache(config).missing() != []
    start = time.perf_counter()
    cached = gym.make(args.env_id, backend="cached", device=args.device).unwrapped
    setup = time.perf_counter() - start
    rate, steps = steps_per_second(cached, args.cached_steps, args.seed)
    print(
        f"cached: {rate:,.0f} steps/s over {steps:,} steps "
        f"(setup {setup:.1f} s{', cache built' if built else ', cache loaded'})"
    )
    live = gym.make(args.env_id, backend="live", device=args.device).unwrapped
    episode = live.n_segments * live.n_layers
    live_rate, live_steps = steps_per_second(live, episode * args.live_episodes, args.seed)
    print(f"live: {live_rate:,.1f} steps/s over {live_steps} steps")
    print(f"cached / live: {rate / live_rate:,.0f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))

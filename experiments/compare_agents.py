"""Compare RL agents and baselines on held-out text: the measured version of the paper's Table 1.

For each method (``gram``, ``svd``): train every algorithm x policy x seed on the train
articles (cached backend), then evaluate each agent and every baseline on the same held-out
eval windows with the live backend (closed loop, real perplexity). Writes under
``results/<run name>/``: per-policy leaderboard CSVs (replayable), ``summary.csv``,
``table.md`` (generated from the CSV), ``pareto.png``, ``config.json`` and TensorBoard logs.

    python experiments/compare_agents.py                 # quick configuration
    python experiments/compare_agents.py --full          # larger configuration
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import tyro
from rich.console import Console
from rich.progress import Progress

import drrl_env  # noqa: F401 (registers the ids)
from agents import (
    ALGOS,
    POLICIES,
    GreedyOraclePolicy,
    RankMetricsCallback,
    SchedulePolicy,
    evaluate_policy_on_windows,
    make_agent,
    make_baseline,
    save_agent,
)
from agents.evaluation import predict_action
from agents.reporting import pareto_plot, summary_table, write_markdown
from drrl_env.flops import METHODS
from drrl_env.rewards import RewardWeights

console = Console()


@dataclass(frozen=True)
class Args:
    env_id: str = "DRRL-Wikitext-v0"
    """Registered environment id (its model, data and segments)."""
    methods: tuple[str, ...] = ("gram", "svd")
    """Low-rank methods compared (each gets its own table)."""
    agents: tuple[str, ...] = (
        "ppo:mlp",
        "dqn:mlp",
        "a2c:mlp",
        "maskable_ppo:mlp",
        "ppo:transformer",
    )
    """``algo:policy`` pairs trained."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds of every agent."""
    total_timesteps: int = 30_000
    """Training steps per agent and seed."""
    train_windows: int = 16
    """Train-split windows in the cached training env."""
    eval_windows: int = 2
    """Held-out eval windows every policy is evaluated on."""
    static_ranks: tuple[int, ...] | None = (16, 24, 32, 48)
    """Static-rank baselines; None for every rank of the grid."""
    energy_taus: tuple[float, ...] = (0.95,)
    """Energy thresholds of the adaptive-SVD baseline."""
    full: bool = False
    """Larger configuration: 3 seeds, 100k steps, 8 eval and 32 train windows, every static
    rank, two energy thresholds."""
    out_dir: str = "results"
    """Parent folder of the run folder."""
    run_name: str | None = None
    """Run folder name; default ``{env}__compare_agents__{seed}__{time}``."""
    alpha: float = RewardWeights.alpha
    """Reward weight of attention fidelity (training and evaluation envs)."""
    beta: float = RewardWeights.beta
    """Reward weight of the executed-FLOPs ratio."""
    gamma: float = RewardWeights.gamma
    """Reward weight of the rank-change perturbation."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device of the frozen model (cuda when present, else cpu)."""
    threads: int = 2
    """Torch threads."""

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"methods: {method!r} is not one of {METHODS}")
        for spec in self.agents:
            algo, policy = parse_agent(spec)
            if algo not in ALGOS or policy not in POLICIES:
                raise ValueError(
                    f"agents: {spec!r} is not algo:policy with algo in {tuple(ALGOS)} "
                    f"and policy in {POLICIES}"
                )
        for name in ("total_timesteps", "train_windows", "eval_windows", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        RewardWeights(self.alpha, self.beta, self.gamma)  # validates the weights

    def env_kwargs(self, method: str) -> dict:
        """``gym.make`` keywords shared by the training and evaluation envs of ``method``."""
        weights = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}
        return {"method": method, "device": self.device, **weights}

    def resolved(self) -> Args:
        if not self.full:
            return self
        return replace(
            self,
            seeds=(0, 1, 2),
            total_timesteps=100_000,
            eval_windows=8,
            train_windows=32,
            static_ranks=None,
            energy_taus=(0.9, 0.95),
            full=False,
        )


def parse_agent(spec: str) -> tuple[str, str]:
    algo, _, policy = spec.partition(":")
    return algo, policy or "mlp"


def train_agent(spec: str, method: str, seed: int, args: Args, run_dir: Path):
    """Train one agent on the cached train env; returns the model."""
    algo, policy = parse_agent(spec)
    env = gym.make(
        args.env_id, split="train", max_windows=args.train_windows, **args.env_kwargs(method)
    )
    model = make_agent(algo, env, policy, seed=seed, tensorboard_log=run_dir / "tensorboard")
    model.learn(
        args.total_timesteps,
        callback=RankMetricsCallback(),
        tb_log_name=f"{method}__{algo}_{policy}__{seed}",
    )
    save_agent(model, run_dir / "models" / f"{method}__{algo}_{policy}__{seed}")
    return model


def greedy_schedules(args: Args, method: str, windows: list[int]) -> dict[int, np.ndarray]:
    """The greedy oracle's ranks on the eval windows, looked up teacher-forced (cached)."""
    env = gym.make(
        args.env_id, split="eval", max_windows=args.eval_windows, **args.env_kwargs(method)
    )
    oracle = GreedyOraclePolicy(env)
    schedules = {}
    for window in windows:
        observation, _ = env.reset(options={"window": window})
        done, info = False, {}
        while not done:
            observation, _, done, _, info = env.step(predict_action(oracle, observation, env))
        schedules[window] = np.array(info["episode_summary"]["ranks"])
    return schedules


def baselines(live: gym.Env, args: Args, method: str, windows: list[int]) -> dict[str, object]:
    """Every baseline policy, built for the live eval env."""
    ranks = live.unwrapped.ranks
    policies = {"full_rank": make_baseline("full_rank", live)}
    for rank in ranks[:-1] if args.static_ranks is None else args.static_ranks:
        policies[f"static_{rank}"] = make_baseline("static_rank", live, rank=rank)
    for tau in args.energy_taus:
        policies[f"energy_{tau:g}"] = make_baseline("energy_threshold", live, tau=tau)
    policies["uniform_random"] = make_baseline("uniform_random", live, seed=0)
    schedules = greedy_schedules(args, method, windows)
    policies["greedy_oracle"] = SchedulePolicy(live, schedules, "greedy_oracle")
    return policies


def run_method(method: str, args: Args, run_dir: Path, progress: Progress) -> pd.DataFrame:
    """Train the agents and evaluate everything for one method; the per-window frame."""
    live = gym.make(
        args.env_id,
        split="eval",
        backend="live",
        max_windows=args.eval_windows,
        **args.env_kwargs(method),
    )
    windows = list(range(live.unwrapped.backend.n_windows))
    full_flops = float(
        live.unwrapped.backend_flops_full_per_layer().sum() * live.unwrapped.n_layers
    )
    frames, csv_dir = [], run_dir / "leaderboard" / method
    jobs = [(spec, seed) for spec in args.agents for seed in args.seeds]
    task = progress.add_task(f"{method}: train + evaluate", total=len(jobs) + 1)
    for spec, seed in jobs:
        started = time.perf_counter()
        model = train_agent(spec, method, seed, args, run_dir)
        progress.console.log(
            f"{method}: trained {spec} seed {seed} ({args.total_timesteps:,} steps) "
            f"in {time.perf_counter() - started:.0f} s; evaluating on {len(windows)} windows"
        )
        name = f"{spec.replace(':', '_')}"
        frame = evaluate_policy_on_windows(
            model, live, windows, csv_dir / f"{name}__{seed}.csv", name=name
        )
        frames.append(frame.assign(seed=seed, kind="rl"))
        progress.advance(task)
    progress.console.log(f"{method}: evaluating the baselines")
    for name, policy in baselines(live, args, method, windows).items():
        frame = evaluate_policy_on_windows(
            policy, live, windows, csv_dir / f"{name}.csv", name=name
        )
        frames.append(frame.assign(seed=0, kind="baseline"))
    progress.advance(task)
    return pd.concat(frames, ignore_index=True).assign(
        method=method, attention_flops_full=full_flops
    )


def main(args: Args) -> Path:
    args = args.resolved()
    torch.set_num_threads(args.threads)
    stamp = int(time.time())
    run_name = args.run_name or f"{args.env_id}__compare_agents__{args.seeds[0]}__{stamp}"
    run_dir = Path(args.out_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Progress(console=console) as progress:
        frames = [run_method(method, args, run_dir, progress) for method in args.methods]
    per_window = pd.concat(frames, ignore_index=True)
    per_window.to_csv(run_dir / "per_window.csv", index=False)
    summary = summary_table(per_window)
    summary.to_csv(run_dir / "summary.csv", index=False)
    write_markdown(summary, run_dir / "table.md")
    pareto_plot(summary, run_dir / "pareto.png")
    config = {
        "args": asdict(args),
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    console.print((run_dir / "table.md").read_text())
    console.print(f"wrote {run_dir} in {config['wall_s']:.0f} s")
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(Args))

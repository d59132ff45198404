"""Reward-weight ablation: how the learned trade-off moves with beta (FLOPs) and gamma.

``reward = alpha * fidelity - beta * flops_ratio - gamma * perturbation``. For each
``(beta, gamma)`` pair, one agent per seed is trained on the cached train env with those
weights, then evaluated on the held-out eval windows (cached backend by default, ``--live`` for
the closed loop and real perplexity). The default pairs are the paper's ablation: the default
weights, no perturbation term (``gamma = 0``), no FLOPs term (``beta = 0``), and a weaker and a
stronger FLOPs weight. Each episode's return is measured under its own setting's weights, so
returns do not compare across settings; ranks, FLOPs reduction, fidelity and perturbation do.

Writes under ``<out_dir>/<run_name>`` (default ``results/reward_ablation/<method>``):
``per_window.csv`` (leaderboard rows with ``beta``, ``gamma``, ``seed``; replayable, appended
as each agent is evaluated), ``ablation.csv`` (one row per setting), ``ablation.md``
(generated from ``ablation.csv``), ``ablation.png`` (FLOPs reduction vs fidelity, one labelled
point per setting), the trained models, TensorBoard logs and ``config.json``. A folder holding
an earlier run is refused unless ``--overwrite`` (start again) or ``--resume`` (keep the
agents it trained and evaluated, train the rest).

    python experiments/reward_ablation.py --total-timesteps 20000
    python experiments/reward_ablation.py --settings 0.5 0.1 0.5 0 0 0.1 --live
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import pandas as pd
import torch
import tyro
from rich.console import Console
from rich.progress import Progress

import drrl_env  # noqa: F401 (registers the ids)
from agents import (
    ALGOS,
    POLICIES,
    RankMetricsCallback,
    evaluate_policy_on_windows,
    make_agent,
    save_agent,
)
from agents.compare import parse_agent
from agents.hyperparams import DISCOUNT
from drrl_env.envs.config import EnvConfig
from drrl_env.methods import method_names
from drrl_env.rewards import RewardWeights
from harness.reporting import (
    markdown_from_frame,
    pyplot,
    save_figure,
    summary_table,
    table_columns,
    with_interval_cells,
)
from harness.runs import (
    ArgumentError,
    RowLog,
    RunArgs,
    check_minimum,
    check_seeds,
    check_unique,
    registered_id,
    run_main,
    unsaved_models_note,
)

console = Console()

KEY = ("beta", "gamma", "seed")
"""The unit of work of ``per_window.csv``: one agent trained and evaluated on every window."""

COLUMNS = (
    "beta",
    "gamma",
    "terms",
    "policy",
    "mean_rank",
    "flops_reduction_pct",
    "flops_reduction_pct_std",
    "mean_fidelity",
    "mean_fidelity_std",
    "mean_perturbation",
    "return",
    "perplexity",
    "delta_ppl_pct",
    *(f"{q}{suffix}" for q in ("mean_kl", "top1_agreement") for suffix in ("", "_low", "_high")),
    "mean_kl_interval",
    "top1_interval",
    "seeds",
    "windows",
)
"""Columns of ``ablation.csv``: token KL and top-1 agreement (live evaluation only; NaN and
``n/a`` on the cached backend) with their 95 % bootstrap intervals over windows."""
MARKDOWN_COLUMNS = table_columns(
    "beta gamma terms mean_rank flops_reduction_pct flops_reduction_pct_std mean_fidelity "
    "mean_fidelity_std mean_perturbation return perplexity delta_ppl_pct mean_kl_interval "
    "top1_interval seeds windows",
    **{"return": ("return (own weights)", "{:.2f}")},
)
"""``(header, ablation.csv column, format)`` of ``ablation.md``."""


@dataclass(frozen=True)
class Args(RunArgs):
    """Reward-weight ablation: one agent per (beta, gamma) setting, evaluated on eval windows."""

    env_id: str = "DRRL-Wikitext-v0"
    """Registered environment id (its model, data and segments)."""
    method: str | None = None
    """Low-rank method; None keeps the environment's."""
    settings: tuple[tuple[float, float], ...] = (
        (0.5, 0.1),
        (0.5, 0.0),
        (0.0, 0.1),
        (0.25, 0.1),
        (1.0, 0.1),
    )
    """(beta, gamma) pairs, flat on the command line: ``--settings 0.5 0.1 0.5 0``."""
    agent: str = "ppo:mlp"
    """``algo:policy`` trained for every setting."""
    discount: float | None = None
    """RL discount factor of the agent; None keeps its default (``agents.hyperparams``)."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds of every setting."""
    total_timesteps: int = 20_000
    """Training steps per setting and seed."""
    train_windows: int = 16
    """Train-split windows in the cached training env."""
    eval_windows: int = 4
    """Held-out eval windows every agent is evaluated on."""
    live: bool = False
    """Evaluate on the live backend (closed loop, perplexity) instead of the cached one."""
    out_dir: str = "results/reward_ablation"
    """Parent folder of the run folder."""
    run_name: str | None = None
    """Run folder inside out_dir; None: the method (``results/reward_ablation/<method>``)."""

    def __post_init__(self) -> None:
        registered_id(self.env_id)
        if self.method is not None and self.method not in method_names():
            raise ArgumentError(
                f"method: {self.method!r} is not a registered method; methods: "
                f"{', '.join(method_names())}"
            )
        if self.run_name is None:
            object.__setattr__(self, "run_name", self.resolved_method)
        super().__post_init__()
        algo, policy = parse_agent(self.agent)
        if algo not in ALGOS or policy not in POLICIES:
            raise ArgumentError(
                f"agent: {self.agent!r} is not algo:policy with algo in {tuple(ALGOS)} "
                f"and policy in {POLICIES}"
            )
        if not self.settings:
            raise ArgumentError("settings must name at least one (beta, gamma) pair")
        if any(weight < 0 for setting in self.settings for weight in setting):
            raise ArgumentError(f"settings: beta and gamma must be >= 0, got {self.settings}")
        check_unique("settings", self.settings)
        check_seeds("seeds", self.seeds)
        check_minimum(self, ("total_timesteps", "train_windows", "eval_windows", "threads"))
        if self.discount is not None and not 0 <= self.discount <= 1:
            raise ArgumentError(f"discount must be in [0, 1], got {self.discount}")

    @property
    def resolved_method(self) -> str:
        """``method``, or the environment's when None."""
        return self.method or registered_id(self.env_id).get("method", EnvConfig.method)


def setting_name(beta: float, gamma: float) -> str:
    """The ``policy`` name of a setting's agent."""
    return f"beta={beta:g} gamma={gamma:g}"


def terms_of(beta: float, gamma: float) -> str:
    """Which reward terms a setting keeps, named against the default weights."""
    default = RewardWeights()
    if (beta, gamma) == (default.beta, default.gamma):
        return "default"
    if beta == 0 and gamma == 0:
        return "fidelity only"
    if gamma == 0:
        return "no perturbation term"
    if beta == 0:
        return "no FLOPs term"
    return "all terms"


def run_id(beta: float, gamma: float, seed: int) -> str:
    """The name of one agent's model file and TensorBoard log."""
    return f"beta{beta:g}_gamma{gamma:g}__{seed}"


def train(args: Args, method: str, beta: float, gamma: float, seed: int, out: Path):
    """Train one agent on the cached train env with these weights; returns the model.

    The TensorBoard logs of an earlier attempt of the same agent (a run cut short) are
    removed first, so a resumed run holds one log per agent.
    """
    algo, _, policy = args.agent.partition(":")
    env = gym.make(
        args.env_id,
        method=method,
        split="train",
        max_windows=args.train_windows,
        beta=beta,
        gamma=gamma,
        device=args.device,
    )
    overrides = {} if args.discount is None else {"gamma": args.discount}
    model = make_agent(
        algo, env, policy or "mlp", seed=seed, tensorboard_log=out / "tensorboard", **overrides
    )
    name = run_id(beta, gamma, seed)
    attempts = out / "tensorboard"
    for earlier in attempts.glob(f"{name}_*") if attempts.is_dir() else ():
        if re.fullmatch(rf"{re.escape(name)}_\d+", earlier.name):
            shutil.rmtree(earlier)
    model.learn(args.total_timesteps, callback=RankMetricsCallback(), tb_log_name=name)
    save_agent(model, out / "models" / name)
    return model


def eval_env(args: Args, method: str, beta: float, gamma: float) -> gym.Env:
    """The held-out eval env of one setting (``--live``: the live backend)."""
    return gym.make(
        args.env_id,
        method=method,
        split="eval",
        backend="live" if args.live else "cached",
        max_windows=args.eval_windows,
        beta=beta,
        gamma=gamma,
        device=args.device,
    )


def ablation_table(per_window: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: window and seed means, standard deviations over seeds, and the
    live token KL and top-1 agreement with 95 % intervals over windows (seed means)."""
    frame = per_window.assign(
        policy=[setting_name(b, g) for b, g in per_window[["beta", "gamma"]].to_numpy()]
    )
    table = summary_table(frame).set_index("policy")
    per_seed = frame.groupby(["policy", "seed"], sort=False)[
        ["mean_fidelity", "mean_perturbation"]
    ].mean()
    settings = per_seed.groupby(level="policy", sort=False)
    table["mean_fidelity_std"] = settings["mean_fidelity"].std(ddof=0)
    table["mean_perturbation"] = settings["mean_perturbation"].mean()
    # the weights themselves, not a mean of copies (8 x 0.1 / 8 is not 0.1 in floating point)
    weights = frame.groupby("policy", sort=False)[["beta", "gamma"]].first()
    table[["beta", "gamma"]] = weights
    table["terms"] = [terms_of(b, g) for b, g in zip(table["beta"], table["gamma"], strict=True)]
    return with_interval_cells(table).reset_index()[list(COLUMNS)]


def to_markdown(table: pd.DataFrame) -> str:
    """``ablation.md``'s table, from ``ablation.csv`` read back."""
    return markdown_from_frame(table, MARKDOWN_COLUMNS)


def plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """FLOPs reduction against fidelity, one labelled point per setting (± over seeds)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    seen: dict[tuple[float, float], int] = {}  # labels of coinciding points are stacked
    for _, row in table.iterrows():
        point = (round(row["mean_fidelity"], 6), round(row["flops_reduction_pct"], 4))
        stacked = seen[point] = seen.get(point, -1) + 1
        ax.errorbar(
            row["mean_fidelity"],
            row["flops_reduction_pct"],
            xerr=row["mean_fidelity_std"] or None,
            yerr=row["flops_reduction_pct_std"] or None,
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            f"β={row['beta']:g}, γ={row['gamma']:g}\n({row['terms']})",
            (row["mean_fidelity"], row["flops_reduction_pct"]),
            fontsize=7,
            xytext=(4, 4 + 20 * stacked),
            textcoords="offset points",
        )
    ax.set_xlabel("mean attention fidelity (cosine vs full rank)")
    ax.set_ylabel("executed attention-FLOPs reduction (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(args: Args) -> Path:
    """Train and evaluate every agent the run folder lacks, then write the tables."""
    folder = args.run_folder()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    method = args.resolved_method
    backend = "live" if args.live else "cached"
    out = folder.prepare(asdict(args), method=method, backend=backend, torch=torch.__version__)
    jobs = [(beta, gamma, seed) for beta, gamma in args.settings for seed in args.seeds]
    probe = eval_env(args, method, *args.settings[0])
    windows = list(range(probe.unwrapped.n_windows))
    probe.close()
    log = RowLog(out / "per_window.csv", KEY)
    keys = {job: log.key_of(dict(zip(KEY, job, strict=True))) for job in jobs}
    counts = log.counts()
    # an agent's rows are written after its model, so complete rows mean a finished agent;
    # committed results hold no models/ and resume without training again
    done = {keys[job] for job in jobs if counts.get(keys[job]) == len(windows)}
    log.retain(done)  # the rows of an agent cut short are made again
    todo = [job for job in jobs if keys[job] not in done]
    if folder.resuming:
        console.log(f"resuming {out}: {len(jobs) - len(todo)} of {len(jobs)} agents finished")
        unsaved = [
            run_id(*job)
            for job in jobs
            if keys[job] in done and not (out / "models" / f"{run_id(*job)}.zip").is_file()
        ]
        if note := unsaved_models_note("agents", unsaved):
            console.log(note)
    with Progress(console=console) as progress:
        task = progress.add_task(f"{method}: train + evaluate", total=len(todo))
        for beta, gamma, seed in todo:
            model = train(args, method, beta, gamma, seed, out)
            env = eval_env(args, method, beta, gamma)
            full_flops = float(
                env.unwrapped.backend_flops_full_per_layer().sum() * env.unwrapped.n_layers
            )
            frame = evaluate_policy_on_windows(model, env, windows)
            log.append(
                frame.assign(
                    beta=beta,
                    gamma=gamma,
                    seed=seed,
                    kind="rl",
                    method=method,
                    attention_flops_full=full_flops,
                )
            )
            env.close()
            progress.advance(task)
    per_window = log.sorted_by([dict(zip(KEY, job, strict=True)) for job in jobs])
    log.rewrite(per_window)
    table = ablation_table(per_window)
    table.to_csv(out / "ablation.csv", index=False)
    alpha = RewardWeights().alpha
    discount = DISCOUNT if args.discount is None else args.discount
    header = (
        f"{args.env_id}, method {method}, agent {args.agent} (discount {discount:g}), "
        f"{args.total_timesteps} steps on "
        f"{args.train_windows} train windows, evaluated on {len(windows)} eval windows "
        f"({backend} backend); reward = {alpha:g} * fidelity - beta * FLOPs ratio - gamma * "
        "perturbation. Returns are under each setting's own weights and do not compare "
        "across rows.\n\n"
    )
    (out / "ablation.md").write_text(header + to_markdown(pd.read_csv(out / "ablation.csv")))
    plot(table, out / "ablation.png", f"{args.env_id}, {method}: reward-weight ablation")
    wall_s = time.perf_counter() - start
    folder.update_config(windows=windows, wall_s=wall_s, threads=torch.get_num_threads())
    console.print((out / "ablation.md").read_text())
    console.print(f"wrote {out} in {wall_s:.0f} s")
    return out


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

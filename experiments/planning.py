"""Learners that plan under a budget against the static allocation, on held-out windows.

For each budget, on a budgeted cached id (default ``DRRL-Mix-TopP-Budget-v0``: ``topp`` at
1024 tokens, prose, code and passkey windows in turn):

- ``static_layer``: the best per-layer allocation, an exact knapsack over layers of the
  mean cached fidelity (cosine) and realised FLOPs of the train windows
  (:func:`agents.allocations.static_per_layer`), the reference of every paired difference;
- ``static_cell``: the best constant schedule of every (segment, layer) cell, the same
  knapsack over cells (what a one-shot policy that ignores its input can do at best);
- the learned agents (``--agents``, names of :func:`agents.make_agent`, e.g. ``dagger`` and
  ``bc``, which imitate the per-window optimum of the train windows; ``lagrangian_ppo``,
  trained on the soft budget with a learned FLOPs price; ``maskable_ppo`` with
  ``--damage-scale`` and ``--reward-at-end`` for reinforcement learning), each with
  ``--seeds`` seeds, trained on the cached train windows;
- ``per_window_optimum``: the knapsack of the eval window's own cached values and realised
  costs (not deployable: the ceiling of adaptivity).

Every policy is played on the live backend, closed loop, under the same budget wall, on the
same held-out windows, and measured against the exact model on the same window: mean token
KL, top-1 agreement, change of perplexity, retrieval (passkey windows), realised FLOPs, and
the actions the wall replaced. The table gives each policy's mean with a 95 % bootstrap
interval over windows (for learned agents, the IQM over seeds with a stratified bootstrap
interval, as ``rliable`` computes it) and the paired difference of KL against
``static_layer`` (for learned agents, of the seeds' mean KL per window): an interval that
contains 0 reads "no difference".

Writes ``models/`` (each trained agent), ``curves/`` and ``learning_curves.png`` (each
agent's return on the cached eval windows while it trains, every eighth of its steps,
beside the fitted schedules' returns on the same windows), ``episodes.csv`` (one row per
live episode, appended as each finishes: ``--resume`` continues), ``frontier.csv``,
``frontier.md`` and ``frontier.png`` under ``<out_dir>/<run_name>``.

    python experiments/planning.py                                   # 0.6 and 0.45, 5 seeds
    python experiments/planning.py --budgets 0.6 --seeds 2 --eval-windows 6
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import tyro
from tqdm import tqdm

from agents import load_agent, make_agent, save_agent
from agents.allocations import Problem, measurements, per_window_optimum, static_per_layer
from agents.curves import LearningCurveCallback, plot_curves, read_curves
from agents.evaluation import actor
from drrl_env.episodes import play_episode
from harness.reporting import (
    markdown_from_frame,
    pyplot,
    save_figure,
    table_columns,
    window_groups,
)
from harness.runs import (
    RESULT_FREE,
    ArgumentError,
    RowLog,
    RunArgs,
    check_budgets,
    check_minimum,
    registered_id,
    run_main,
    write_atomic,
)
from harness.statistics import iqm_interval, mean_interval, paired_difference, window_labels

REFERENCE = "static_layer"
SOFT_BUDGET_LEARNERS = ("lagrangian_ppo",)
"""Learners that train on the soft budget (``enforce_budget=False``: they price the budget
themselves) and are played, like every policy, under the wall."""
TABLES = ("static_layer", "static_cell", "per_window_optimum")
KEY = ("budget", "policy", "seed", "window")
METRICS = (
    "mean_kl",
    "top1_agreement",
    "delta_ppl_pct",
    "retrieval_correct",
    "flops_ratio",
    "masked_actions",
)
COLUMNS_MD = table_columns(
    "budget policy seeds mean_kl kl_vs_static verdict kl_vs_cell verdict_vs_cell top1_agreement "
    "delta_ppl_pct retrieval_correct flops_ratio masked_actions windows",
    delta_ppl_pct=("Δ ppl %", "{}"),
)


@dataclass(frozen=True)
class Args(RunArgs):
    """Learned planners, the static allocation and the per-window optimum under a budget."""

    env_id: str = "DRRL-Mix-TopP-Budget-v0"
    """A registered cached id with a budget."""
    budgets: tuple[float, ...] = (0.6, 0.45)
    """FLOPs budgets, fractions of exact attention's, each in (0, 1]. Each budget's rows
    stand alone, so ``--resume`` may name other budgets than the run started with: it plays
    what they lack, and the tables show the budgets named."""
    agents: tuple[str, ...] = ("dagger",)
    """Learners (names of ``agents.make_agent``) trained with every seed."""
    seeds: int = 5
    """Seeds per learner."""
    train_windows: int = 12
    """Cached train windows the static allocations and the learners are fitted on."""
    eval_windows: int = 24
    """Held-out windows every policy is played on, live."""
    total_timesteps: int | None = None
    """Training steps of each learner; default 4 passes over the train windows."""
    damage_scale: float | None = None
    """Reward in damage units for the learners' env (``drrl_env.rewards.DAMAGE_SCALE``:
    10); the imitators ignore the reward."""
    reward_at_end: bool = False
    """Pay the learners' env's return at the episode's end only."""
    run_name: str = "planning"
    """Run folder inside out_dir."""

    def __post_init__(self) -> None:
        registered_id(self.env_id, cached=True, budgeted=True)
        check_minimum(self, ("train_windows", "eval_windows", "seeds", "threads"))
        if self.total_timesteps is not None:
            check_minimum(self, ("total_timesteps",))
        check_budgets(self.budgets)
        from agents.factory import ALGOS

        for agent in self.agents:
            if agent not in ALGOS or agent == "dqn":
                raise ArgumentError(
                    f"agents: {agent!r} is not a masked learner; one of "
                    f"{', '.join(a for a in ALGOS if a != 'dqn')}"
                )
        if len(set(self.agents)) != len(self.agents) or set(self.agents) & set(TABLES):
            raise ArgumentError(f"agents must not repeat nor be one of {TABLES}")
        super().__post_init__()

    def env_kwargs(self, split: str, budget: float, backend: str = "cached") -> dict:
        windows = self.train_windows if split == "train" else self.eval_windows
        return {
            "split": split,
            "max_windows": windows,
            "budget": budget,
            "backend": backend,
            "device": self.device,
            "damage_scale": self.damage_scale,
            "reward_at_end": self.reward_at_end,
        }


def fitted_tables(args: Args, budget: float) -> dict:
    """The schedules of :data:`TABLES`: ``{policy: {window: (S, L) actions}}`` for every
    eval window, from the cached train and eval windows (built first if missing)."""
    train = gym.make(args.env_id, **args.env_kwargs("train", budget))
    evaluation = gym.make(args.env_id, **args.env_kwargs("eval", budget))
    values, costs = measurements(train)
    eval_values, eval_costs = measurements(evaluation)
    problem = Problem(values, costs, budget)
    layer = static_per_layer(problem)
    cell = per_window_optimum(values.mean(axis=0), costs.mean(axis=0), budget)
    windows = range(len(eval_values))
    train.close()
    evaluation.close()
    return {
        "static_layer": {w: layer for w in windows},
        "static_cell": {w: cell for w in windows},
        "per_window_optimum": {
            w: per_window_optimum(eval_values[w], eval_costs[w], budget) for w in windows
        },
    }


def agent_files(folder: Path, algo: str, budget: float, seed: int) -> tuple[Path, Path]:
    """The saved model and learning curve of the agent ``algo`` of ``seed`` at ``budget``."""
    stem = f"{algo}__{budget:g}__{seed}"
    return folder / "models" / f"{stem}.zip", folder / "curves" / f"{stem}.csv"


def trained_agent(args: Args, folder: Path, algo: str, seed: int, budget: float, tables: dict):
    """The agent ``algo`` of ``seed`` at ``budget``, and its learning curve.

    Trains it (with a :class:`~agents.curves.LearningCurveCallback` on the cached eval
    windows, beside the ``tables`` schedules) unless both its model and its curve are saved.
    A model saved without its curve is trained again for the curve, and the two must be the
    same network, parameter for parameter (training is seeded), or the run stops.
    """
    soft = {"enforce_budget": False} if algo in SOFT_BUDGET_LEARNERS else {}
    train = gym.make(args.env_id, **args.env_kwargs("train", budget), **soft)
    path, curve_path = agent_files(folder, algo, budget, seed)
    stem = path.stem
    saved = load_agent(path, env=train) if path.exists() else None
    if saved is not None and curve_path.exists():
        return saved
    steps = args.total_timesteps or 4 * args.train_windows * train.unwrapped.steps
    evaluation = gym.make(args.env_id, **args.env_kwargs("eval", budget))
    windows = list(range(evaluation.unwrapped.n_windows))
    baselines = {name: schedule_chooser(schedules) for name, schedules in tables.items()}
    curve = LearningCurveCallback(evaluation, windows, max(steps // 8, 1), baselines=baselines)
    model = make_agent(algo, train, seed=seed)
    model.learn(steps, callback=curve)
    if saved is not None:
        trained, kept = model.policy.state_dict(), saved.policy.state_dict()
        if any(not torch.equal(trained[k], kept[k]) for k in kept):
            raise RuntimeError(f"{stem}: training again gave another network than the saved one")
        model = saved
    else:
        save_agent(model, path)
    labels = {"budget": budget, "policy": algo, "seed": seed, "method": f"budget {budget:g}"}
    write_atomic(curve_path, pd.DataFrame(curve.history).assign(**labels).to_csv(index=False))
    return model


def schedule_chooser(schedules: dict):
    """A chooser playing ``schedules[window]`` (an (S, L) table) on whatever window runs."""

    def choose(observation, env):
        base = env.unwrapped
        return int(np.asarray(schedules[base.window]).reshape(-1)[base.step_index])

    return choose


def episode_row(trace) -> dict:
    summary = trace.summary
    return {
        "mean_kl": summary["mean_kl"],
        "top1_agreement": summary["top1_agreement"],
        "delta_ppl_pct": 100 * (summary["perplexity"] / summary["perplexity_full"] - 1),
        "retrieval_correct": summary.get("retrieval_correct", math.nan),
        "flops_ratio": summary["flops_ratio"],
        "masked_actions": summary["masked_actions"],
        "window_kind": summary.get("window_kind", ""),
        "actions": json.dumps(summary["actions"]),
    }


def frontier(rows: pd.DataFrame, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Per (budget, policy): metric means with intervals and KL paired against the static
    allocation (learned agents: IQM over seeds, seeds averaged per window for the pair), and
    for learned agents against ``static_cell`` too, the best constant schedule: a learner
    below it adapts to its input, not only to the position of a cell.

    ``groups`` (one label per window index, :func:`harness.reporting.window_groups`):
    windows that share text are resampled together by the intervals over windows (the IQM's
    stratified bootstrap resamples seeds within each window); None: every window apart.
    """
    table = []
    for budget, group in rows.groupby("budget", sort=False):
        reference = group[group["policy"] == REFERENCE].set_index("window")["mean_kl"]
        constant = group[group["policy"] == "static_cell"].set_index("window")["mean_kl"]
        for policy, part in group.groupby("policy", sort=False):
            seeds = part["seed"].nunique()
            per_window = part.groupby("window").mean(numeric_only=True).sort_index()
            row = {"budget": budget, "policy": policy, "seeds": seeds, "windows": len(per_window)}
            for metric in METRICS:
                values = per_window[metric].dropna()
                scientific = metric == "mean_kl"
                if not len(values):
                    row[metric] = math.nan
                    continue
                if seeds > 1 and metric == "mean_kl":
                    matrix = part.pivot(index="seed", columns="window", values=metric)
                    interval = iqm_interval(matrix.to_numpy())
                else:
                    interval = mean_interval(values, groups=window_labels(groups, values.index))
                row[metric] = interval.format(scientific=scientific)
                row[f"{metric}_mean"] = interval.estimate
            shared = per_window.index.intersection(reference.index)
            if policy != REFERENCE and len(shared):
                diff = paired_difference(
                    per_window.loc[shared, "mean_kl"],
                    reference.loc[shared],
                    groups=window_labels(groups, shared),
                )
                row.update(diff.columns("kl_vs_static", scientific=True))
            shared = per_window.index.intersection(constant.index)
            if policy not in TABLES and len(shared):  # a learner against the best constant
                diff = paired_difference(
                    per_window.loc[shared, "mean_kl"],
                    constant.loc[shared],
                    groups=window_labels(groups, shared),
                )
                row["kl_vs_cell"] = diff.format(scientific=True)
                row["verdict_vs_cell"] = diff.verdict("lower KL", "higher KL")
            table.append(row)
    return pd.DataFrame(table)


def plot(table: pd.DataFrame, path: Path) -> Path:
    """KL paired against the static allocation with its interval, per budget and policy."""
    plt = pyplot()

    budgets = list(dict.fromkeys(table["budget"]))
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        part = table[(table["budget"] == budget) & table["kl_vs_static_mean"].notna()]
        y = np.arange(len(part))
        centre = part["kl_vs_static_mean"].to_numpy()
        error = np.vstack(
            [centre - part["kl_vs_static_low"].to_numpy(), part["kl_vs_static_high"] - centre]
        )
        ax.errorbar(centre, y, xerr=np.abs(error), fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", lw=1, ls="--")
        ax.set_yticks(y, part["policy"])
        ax.set(xlabel="mean token KL − static_layer (95 % CI)", title=f"budget {budget:g}")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(args: Args) -> Path:
    """Fit and train on train windows, play everything live on eval windows, write tables."""
    folder = args.run_folder(ignored=(*RESULT_FREE, "budgets"))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder.prepare(asdict(args), torch=torch.__version__)
    log = RowLog(folder.path / "episodes.csv", KEY)
    done = log.keys()
    groups = None
    for budget in args.budgets:
        live = gym.make(args.env_id, **args.env_kwargs("eval", budget, "live"))
        windows = range(live.unwrapped.n_windows)
        if groups is None:
            groups = window_groups(live, len(windows))
        plans = [(policy, 0, policy) for policy in TABLES]  # (policy, seed, how)
        plans += [(algo, seed, (algo, seed)) for algo in args.agents for seed in range(args.seeds)]
        todo = [
            (policy, seed, how, window)
            for policy, seed, how in plans
            for window in windows
            if log.key_of({"budget": budget, "policy": policy, "seed": seed, "window": window})
            not in done
        ]
        # an agent is loaded or trained only for episodes still to play or a missing curve,
        # and the schedules are fitted (the rollout caches built) only for them or for
        # episodes of a fitted policy still to play: committed results hold no models/ and
        # rebuild their tables without training or caching again
        learners = [
            (algo, seed)
            for algo in args.agents
            for seed in range(args.seeds)
            if any(how == (algo, seed) for _, _, how, _ in todo)
            or not agent_files(folder.path, algo, budget, seed)[1].is_file()
        ]
        fitting = learners or any(policy in TABLES for policy, *_ in todo)
        tables = fitted_tables(args, budget) if fitting else {}
        models = {
            (algo, seed): trained_agent(args, folder.path, algo, seed, budget, tables)
            for algo, seed in learners
        }
        todo.sort(key=lambda item: item[3])  # window by window: its exact reference runs once
        for policy, seed, how, window in tqdm(todo, desc=f"budget {budget:g}", unit="ep"):
            choose = tables[how][window] if how in tables else actor(models[how])
            trace = play_episode(live, choose, window)
            row = {"budget": budget, "policy": policy, "seed": seed, "window": window}
            log.append(pd.DataFrame([{**row, **episode_row(trace)}]))
        live.close()
    rows = log.read()
    rows = rows[rows["budget"].isin(args.budgets)]
    table = frontier(rows, groups)
    table.to_csv(folder.path / "frontier.csv", index=False)
    written = pd.read_csv(folder.path / "frontier.csv")
    (folder.path / "frontier.md").write_text(markdown_from_frame(written, COLUMNS_MD))
    plot(written, folder.path / "frontier.png")
    curves = read_curves(folder.path / "curves")
    if not curves.empty:
        plot_curves(curves, folder.path / "learning_curves.png")
    folder.update_config(wall_s=time.perf_counter() - started, episodes=len(rows))
    print((folder.path / "frontier.md").read_text())
    return folder.path


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

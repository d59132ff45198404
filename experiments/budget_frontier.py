"""The budget frontier: perplexity change and executed FLOPs of agents and baselines per budget.

For each budget (a cap on an episode's executed attention FLOPs, as a fraction of exact
attention's), one run of :mod:`agents.compare` on the budgeted env: every agent x seed
trained on the cached train windows with that budget, then every agent and the budget
baselines (best uniform setting, static per-layer allocation, Lagrangian greedy, the
teacher-forced optimum by dynamic programming, uniform random, exact attention as far as
the wall allows) evaluated closed loop on the held-out windows. Each budget's run folder
is ``<out_dir>/<run_name>/budget_<b>``; the frontier gathers their summaries into
``frontier.csv``, ``frontier.md`` (generated from the CSV) and ``frontier.png``.

    python experiments/budget_frontier.py                       # 4 budgets x 4 agents x 5 seeds
    python experiments/budget_frontier.py --budgets 0.6 --seeds 0 --total-timesteps 5000
    python experiments/budget_frontier.py --resume              # finish an interrupted run
    python experiments/budget_frontier.py --resume --budgets 0.75 0.6   # add a budget to a run
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import tyro

from agents.compare import Args as CompareArgs
from agents.compare import main as compare
from harness.reporting import (
    QUALITY_CELLS,
    markdown_from_frame,
    ppl_axes,
    pyplot,
    save_figure,
    table_columns,
    with_interval_cells,
)
from harness.runs import RESULT_FREE, ArgumentError, RunArgs, check_unique, run_main

FRONTIER_COLUMNS = table_columns(
    "budget policy mean_kl_interval kl_vs_reference_interval verdict top1_interval "
    "delta_ppl_pct delta_ppl_pct_std flops_ratio mean_fidelity seeds windows",
    flops_ratio=("executed FLOPs / exact", "{:.3f}"),
)
"""``(header, CSV column, format)`` of the Markdown table."""
INTERVALS = (*QUALITY_CELLS, ("kl_vs_reference_interval", "kl_vs_reference", True))
"""(table column, summary column, scientific) of the quality cells with their intervals."""


@dataclass(frozen=True)
class Args(RunArgs):
    """Agents and budget baselines at several FLOPs budgets, evaluated closed loop."""

    env_id: str = "DRRL-Wikitext-Budget-v0"
    """A registered budgeted id (its method and action grid; its budget is replaced)."""
    budgets: tuple[float, ...] = (0.9, 0.75, 0.6, 0.45)
    """FLOPs budgets, fractions of exact attention's, each in (0, 1]. Each budget has its own
    sub-folder, so ``--resume`` may name other budgets than the run started with: it runs
    the budgets it lacks, keeps the finished ones, and the frontier shows the budgets named
    (``budgets_shown`` in ``config.json``)."""
    agents: tuple[str, ...] = ("ppo:mlp", "maskable_ppo:mlp", "dqn:mlp", "ppo:transformer")
    """``algo:policy`` pairs trained at every budget."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Training seeds of every agent (5: the fewest whose interquartile mean and stratified
    bootstrap interval mean something)."""
    total_timesteps: int = 30_000
    """Training steps per agent, seed and budget."""
    train_windows: int = 16
    """Train-split windows of the cached training env (and of the baselines' measurements)."""
    eval_windows: int = 4
    """Held-out windows every policy is evaluated on, live."""
    run_name: str = "budget_frontier"
    """Run folder inside out_dir (one sub-folder per budget); ``--resume`` keeps the finished
    trials and baselines of every budget and runs the rest."""
    executor: Literal["local", "ray"] = "local"
    """Where trials run (``ray``: ``pip install 'drrl-gym[ray]'``)."""
    address: str | None = None
    """Ray cluster address; unset starts a local Ray instance."""
    n_envs: int = 1
    """Copies of the training env per agent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.budgets:
            raise ArgumentError("budgets must name at least one budget")
        for budget in self.budgets:
            if not 0 < budget <= 1:
                raise ArgumentError(f"budgets: {budget!r} is outside (0, 1]")
        check_unique("budgets", self.budgets)
        for budget in self.budgets:  # every budget's arguments, checked before any work
            self.compare_args(budget)

    def compare_args(self, budget: float) -> CompareArgs:
        """The :mod:`agents.compare` arguments of one budget's run."""
        from drrl_env.inspect import env_config

        try:
            method = env_config(self.env_id, device="cpu").method
        except ValueError as error:
            raise ArgumentError(str(error)) from None
        return CompareArgs(
            env_id=self.env_id,
            methods=(method,),
            agents=self.agents,
            seeds=self.seeds,
            total_timesteps=self.total_timesteps,
            train_windows=self.train_windows,
            eval_windows=self.eval_windows,
            budget=budget,
            out_dir=str(Path(self.out_dir) / self.run_name),
            run_name=f"budget_{budget:g}",
            overwrite=self.overwrite,
            resume=self.resume,
            executor=self.executor,
            address=self.address,
            n_envs=self.n_envs,
            device=self.device,
            threads=self.threads,
        )


def frontier(summaries: dict[float, pd.DataFrame]) -> pd.DataFrame:
    """One row per (budget, policy): the summary's numbers, the executed FLOPs ratio, and
    token KL, top-1 agreement and KL paired against the static allocation, each as its
    value with the 95 % interval (``n/a`` in runs made before KL was measured)."""
    frames = []
    for budget, summary in summaries.items():
        frame = summary.assign(budget=budget, flops_ratio=1 - summary["flops_reduction_pct"] / 100)
        frames.append(with_interval_cells(frame, INTERVALS))
    return pd.concat(frames, ignore_index=True)


def plot(table: pd.DataFrame, path: Path) -> Path:
    """Perplexity change vs executed FLOPs, one line per policy across the budgets."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for policy, part in table.groupby("policy", sort=False):
        part = part.sort_values("budget")
        rl = part["kind"].iloc[0] == "rl"
        ax.errorbar(
            part["flops_ratio"],
            part["delta_ppl_pct"],
            yerr=part["delta_ppl_pct_std"].fillna(0),
            fmt="-o" if rl else "--s",
            label=policy,
            capsize=3,
            markersize=5,
        )
    for budget in sorted(set(table["budget"])):
        ax.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
    ppl_axes(ax, table["delta_ppl_pct"])
    ax.set_xlabel("executed attention FLOPs / exact attention (dotted: budgets)")
    ax.set_title("budget frontier: closed-loop perplexity change on held-out windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return save_figure(fig, path)


def main(args: Args) -> Path:
    """Run every budget, then write the frontier table and plot."""
    started = time.perf_counter()
    folder = args.run_folder((*RESULT_FREE, "executor", "address", "budgets"))
    folder.prepare(asdict(args), torch=torch.__version__)
    folder.update_config(budgets_shown=list(args.budgets))
    summaries = {}
    for budget in args.budgets:
        run_dir = compare(args.compare_args(budget))
        summaries[budget] = pd.read_csv(run_dir / "summary.csv")
    table = frontier(summaries)
    columns = ["budget", *(c for c in table.columns if c != "budget")]
    table[columns].to_csv(folder.path / "frontier.csv", index=False)
    written = pd.read_csv(folder.path / "frontier.csv")
    (folder.path / "frontier.md").write_text(markdown_from_frame(written, FRONTIER_COLUMNS))
    plot(written, folder.path / "frontier.png")
    folder.update_config(wall_s=time.perf_counter() - started)
    print((folder.path / "frontier.md").read_text())
    return folder.path


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

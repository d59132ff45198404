"""Proxy validity: how well each fidelity term's cached episode sum tracks real perplexity.

On held-out windows, many action schedules (static actions, uniform random, energy
thresholds, greedy oracles of several reward settings, random mixtures of two actions) are
played twice: on the cached backend, where each fidelity term's raw measurement is summed
over the episode (teacher forced, every cell measured on the inputs of exact attention),
and on the live backend, which runs the model closed loop and measures the window's
perplexity and the mean token KL of its next-token distributions to exact attention's. For
each term, the Spearman rank correlation between its predicted damage (``sum(1 - cosine)``,
``sum(dnll_taylor)``, ``sum(dnll_fisher)``) and each live target (the change of
log-perplexity; the KL, far less noisy) says how well the term ranks schedules by what they
cost the model.

Writes ``schedules.csv`` (one row per window and schedule, appended as each finishes:
``--resume`` skips the finished ones), ``correlations.csv`` and ``correlations.md``
(generated from the CSV) and ``scatter.png`` under ``<out_dir>/<run_name>``.

    python experiments/proxy_validity.py                       # 2 windows x 50 schedules
    python experiments/proxy_validity.py --eval-windows 1 --random 5 --resume
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import pandas as pd
import torch
import tyro
from tqdm import tqdm

import drrl_env  # noqa: F401 (registers the ids)
from agents.proxy import PROXIES, cached_proxies, correlations, live_change, schedules
from harness.reporting import markdown_from_frame, pyplot, save_figure, table_columns
from harness.runs import (
    ArgumentError,
    RowLog,
    RunFolder,
    check_device,
    check_minimum,
    field_defaults,
    registered_id,
    run_main,
)

KEY = ("window", "schedule")
COLUMNS_MD = table_columns(
    "term proxy spearman pearson spearman_kl pearson_kl schedules",
    term=("fidelity term", "{}"),
    proxy=("predicted damage", "{}"),
)


@dataclass(frozen=True)
class Args:
    """Rank correlation of each fidelity term with the live change of log-perplexity."""

    env_id: str = "DRRL-Wikitext-TopK-v0"
    """Registered id (its model, method and data); the guardrail is switched off."""
    keeps: tuple[float, ...] | None = (0.25, 0.5)
    """Keep fractions of a sparse method's (rank, keep) grid; None keeps the id's own."""
    eval_windows: int = 2
    """Held-out windows every schedule runs on."""
    random: int = 14
    """Uniform random schedules per window."""
    mixtures: int = 12
    """Random mixtures of two actions per window."""
    energy_taus: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99)
    """Energy-threshold schedules."""
    greedy_betas: tuple[float, ...] = (0.1, 0.3, 1.0)
    """FLOPs weights of the greedy-oracle schedules (one per fidelity term and weight)."""
    seed: int = 0
    """Seed of the random and mixed schedules."""
    out_dir: str = "results"
    """Parent folder of the run folder."""
    run_name: str = "proxy_validity"
    """Run folder inside out_dir."""
    overwrite: bool = False
    """Start again in an existing run folder."""
    resume: bool = False
    """Keep the finished schedules and run the rest."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device of the model."""
    threads: int = 2
    """Torch threads."""

    def __post_init__(self) -> None:
        registered_id(self.env_id)
        check_minimum(self, ("eval_windows", "threads"))
        check_minimum(self, ("random", "mixtures"), low=0)
        for tau in self.energy_taus:
            if not 0 < tau <= 1:
                raise ArgumentError(f"energy_taus: {tau!r} is outside (0, 1]")
        check_device(self.device)

    def env_kwargs(self) -> dict:
        kwargs = {"split": "eval", "max_windows": self.eval_windows, "max_perturbation": 1.0}
        kwargs["device"] = self.device
        return kwargs if self.keeps is None else {**kwargs, "keeps": self.keeps}


def smallest_magnitude(values: pd.Series) -> float:
    """The smallest nonzero |value| (the linear range of a symlog axis), 1 if none."""
    magnitudes = values.abs()[values != 0]
    return float(magnitudes.min()) if len(magnitudes) else 1.0


def scatter(rows: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """One panel per term and live target: predicted damage (cached) vs the live damage
    (change of log-perplexity; mean token KL when measured)."""
    plt = pyplot()

    targets = [("delta_log_ppl", "spearman", "live change of log-perplexity")]
    if "mean_kl" in rows and rows["mean_kl"].notna().all():
        targets.append(("mean_kl", "spearman_kl", "live mean token KL"))
    fig, axes = plt.subplots(
        len(targets), len(PROXIES), figsize=(5 * len(PROXIES), 4.2 * len(targets)), squeeze=False
    )
    kinds = rows["schedule"].str.split("_").str[0]
    for row_axes, (target, rho_column, ylabel) in zip(axes, targets, strict=True):
        for ax, (term, (column, label)) in zip(row_axes, PROXIES.items(), strict=True):
            for kind in dict.fromkeys(kinds):
                part = rows[kinds == kind]
                ax.scatter(part[column], part[target], s=14, label=kind, alpha=0.8)
            rho = float(table.loc[table["term"] == term, rho_column].iloc[0])
            ax.set(xlabel=label, ylabel=ylabel, title=f"{term}: ρ = {rho:.3f}")
            ax.set_xscale("symlog", linthresh=smallest_magnitude(rows[column]))
            ax.set_yscale("symlog", linthresh=smallest_magnitude(rows[target]))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def main(args: Args) -> Path:
    """Play every schedule cached and live, then write the correlations and the scatter."""
    folder = RunFolder(
        Path(args.out_dir) / args.run_name,
        overwrite=args.overwrite,
        resume=args.resume,
        ignored=("out_dir", "run_name", "overwrite", "resume", "threads"),
        defaults=field_defaults(Args),
    )
    folder.check(asdict(args))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cached = gym.make(args.env_id, **args.env_kwargs())
    live = gym.make(args.env_id, **args.env_kwargs(), backend="live")
    folder.prepare(asdict(args), torch=torch.__version__)
    log = RowLog(folder.path / "schedules.csv", KEY)
    done = log.keys()  # (window, schedule) as the strings the file holds
    windows = range(cached.unwrapped.n_windows)
    plans = {
        window: schedules(
            cached,
            window,
            args.random,
            args.mixtures,
            args.energy_taus,
            args.greedy_betas,
            args.seed,
        )
        for window in windows
    }
    todo = [
        (window, name)
        for window, plan in plans.items()
        for name in plan
        if log.key_of({"window": window, "schedule": name}) not in done
    ]
    for window, name in tqdm(todo, desc="live episodes", unit="schedule"):
        actions = plans[window][name]
        row = {"window": window, "schedule": name, "actions": json.dumps(actions.tolist())}
        row |= cached_proxies(cached, window, actions) | live_change(live, window, actions)
        log.append(pd.DataFrame([row]))
    rows = log.read()
    table = correlations(rows)
    table.to_csv(folder.path / "correlations.csv", index=False)
    written = pd.read_csv(folder.path / "correlations.csv")
    (folder.path / "correlations.md").write_text(markdown_from_frame(written, COLUMNS_MD))
    scatter(rows, written, folder.path / "scatter.png")
    folder.update_config(wall_s=time.perf_counter() - started, schedules=len(rows))
    print((folder.path / "correlations.md").read_text())
    return folder.path


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

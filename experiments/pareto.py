"""The Pareto front of static ranks and energy thresholds, with RL agents on the same axes.

On the held-out eval windows, live backend (closed loop, real perplexity), every static rank
of the grid (and full rank) and a sweep of energy thresholds are played; each point is the
executed attention-FLOPs reduction against the perplexity increase over full rank. An
adaptive policy is worth its training only where it lies beyond this front. With
``--agents-csv`` (the ``per_window.csv`` of an ``experiments/compare_agents.py`` run) the
RL agents of the same method are placed on the same axes.

Writes under ``<out_dir>/<run_name>`` (default ``results/pareto/<method>``): ``per_window.csv``
(the baselines' leaderboard rows, replayable, appended as each baseline finishes),
``front.csv`` (one row per policy, ``pareto``: non-dominated among all rows,
``undominated_by_baselines``: no static-rank or energy point dominates it), ``front.md``
(generated from ``front.csv``), ``pareto.png`` and ``config.json``. A folder holding an
earlier run is refused unless ``--overwrite`` (start again) or ``--resume`` (keep the
baselines it finished, play the rest).

    python experiments/pareto.py --method gram --eval-windows 4
    python experiments/pareto.py --agents-csv results/<run>/per_window.csv
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import pandas as pd
import torch
import tyro
from rich.console import Console
from rich.progress import Progress

import drrl_env  # noqa: F401 (registers the ids)
from agents import evaluate_policy_on_windows, make_baseline, read_csv
from agents.evaluation import config_json
from drrl_env.methods import method_names
from harness.reporting import (
    FRONT_FAMILIES,
    front_plot,
    markdown_from_frame,
    pareto_front,
    summary_table,
    table_columns,
    undominated_by,
)
from harness.runs import (
    ArgumentError,
    RowLog,
    RunArgs,
    check_minimum,
    check_unique,
    registered_id,
    run_main,
)

console = Console()

X, Y = "flops_reduction_pct", "delta_ppl_pct"
KEY = ("policy",)
"""The unit of work of ``per_window.csv``: one baseline on every eval window."""
PROBLEM_FIELDS = ("model", "corpus", "split", "eval_fraction", "seq_len", "segment_length")
"""Env fields an agents CSV must share with the front (besides the method) to be comparable."""

FRONT_COLUMNS = table_columns(
    "family policy perplexity delta_ppl_pct flops_reduction_pct attention_gflops mean_rank "
    "mean_fidelity pareto undominated_by_baselines size",
    mean_fidelity=("fidelity", "{:.3f}"),
)
"""``(header, front.csv column, format)`` of ``front.md``."""


@dataclass(frozen=True)
class Args(RunArgs):
    """Pareto front of static ranks and energy thresholds on live eval windows."""

    env_id: str = "DRRL-Wikitext-v0"
    """Registered environment id (its model, data and segments); evaluated live."""
    method: str = "gram"
    """Low-rank method of the front (``gram``, ``svd``, ``calibrated``)."""
    eval_windows: int = 4
    """Held-out eval windows (the first ones of the eval split) every policy plays."""
    static_ranks: tuple[int, ...] | None = None
    """Static ranks of the front; None for every rank of the grid (full rank is always in)."""
    energy_taus: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
    """Energy thresholds of the adaptive-SVD rule (smallest rank keeping tau of the energy)."""
    max_perturbation: float | None = None
    """Guardrail of the env (masked ranks are raised); None keeps the env default."""
    agents_csv: Path | None = None
    """``per_window.csv`` of a compare_agents run: its RL rows of this method join the plot."""
    out_dir: str = "results/pareto"
    """Parent folder of the run folder."""
    run_name: str | None = None
    """Run folder inside out_dir; None: the method (``results/pareto/<method>``)."""

    def __post_init__(self) -> None:
        if self.run_name is None:
            object.__setattr__(self, "run_name", self.method)
        super().__post_init__()
        registered_id(self.env_id)
        if self.method not in method_names():
            raise ArgumentError(
                f"method: {self.method!r} is not a registered method; methods: "
                f"{', '.join(method_names())}"
            )
        check_minimum(self, ("eval_windows", "threads"))
        if any(not 0 < tau <= 1 for tau in self.energy_taus):
            raise ArgumentError(f"energy_taus must be in (0, 1], got {self.energy_taus}")
        check_unique("energy_taus", self.energy_taus)
        check_unique("static_ranks", self.static_ranks or ())
        if self.max_perturbation is not None and not 0 <= self.max_perturbation <= 1:
            raise ArgumentError(f"max_perturbation must be in [0, 1], got {self.max_perturbation}")
        if self.agents_csv is not None and not self.agents_csv.is_file():
            raise ArgumentError(f"agents_csv: {self.agents_csv} is not a file")


def baseline_policies(env: gym.Env, args: Args) -> dict[str, tuple[str, str, object]]:
    """Name -> (family, label, policy) of full rank, the static ranks and the thresholds.

    Raises:
        ArgumentError: A static rank is not a rank of the env's grid.
    """
    grid = env.unwrapped.actions
    policies = {"full_rank": ("static", str(grid.head_dim), make_baseline("full_rank", env))}
    if args.static_ranks is None:
        settings = grid.settings[:-1]  # every action but exact attention
    else:
        ranks = sorted({int(s.rank) for s in grid.settings})
        missing = sorted(set(args.static_ranks) - set(ranks))
        if missing:
            raise ArgumentError(f"static_ranks: {missing} are not ranks of the grid {ranks}")
        settings = [s for s in grid.settings if s.rank in args.static_ranks]
    for setting in settings:
        policy = make_baseline("static_rank", env, rank=setting.rank, keep=setting.keep)
        policies[policy.name] = ("static", setting.label()[1:], policy)
    for tau in args.energy_taus:
        policy = make_baseline("energy_threshold", env, tau=tau)
        policies[f"energy_{tau:g}"] = ("energy", f"{tau:g}", policy)
    return policies


def agent_rows(path: Path, env: gym.Env, method: str, windows: list[int]) -> pd.DataFrame:
    """The RL rows of a compare_agents ``per_window.csv`` for ``method``, checked comparable.

    Raises:
        ArgumentError: No RL row of ``method``, or the rows come from another model, data or
            segmentation.
    """
    try:
        frame = read_csv(path)
    except ValueError as error:
        raise ArgumentError(f"agents_csv: {error}") from None
    needed = {"policy", "kind", "method", "seed", "window", "env_config", "attention_flops_full"}
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise ArgumentError(f"{path} is not a compare_agents per_window.csv: no {missing}")
    frame = frame[(frame["kind"] == "rl") & (frame["method"] == method)].copy()
    if frame.empty:
        raise ArgumentError(f"{path} holds no RL rows of method {method!r}")
    frame["seed"] = frame["seed"].astype(int)
    frame["attention_flops_full"] = frame["attention_flops_full"].astype(float)
    ours = json.loads(config_json(env))
    for text in frame["env_config"].unique():
        theirs = json.loads(text)
        different = [k for k in PROBLEM_FIELDS if theirs.get(k) != ours.get(k)]
        if different:
            raise ArgumentError(
                f"{path}: the agents ran on another problem ({', '.join(different)} differ: "
                + ", ".join(f"{k}={theirs.get(k)!r} vs {ours.get(k)!r}" for k in different)
                + ")"
            )
    if set(frame["window"]) != set(windows):
        warnings.warn(
            f"the agents were evaluated on windows {sorted(set(frame['window']))}, the front on "
            f"{windows}: each point is still relative to full rank on its own windows",
            stacklevel=2,
        )
    return frame


def front_table(per_window: pd.DataFrame, labels: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Summary per policy with its family, label and the two Pareto marks."""
    front = summary_table(per_window)
    front["size"] = front["seeds"].astype(str) + " × " + front["windows"].astype(str)
    front["family"] = [labels.get(p, ("rl", p))[0] for p in front["policy"]]
    front["label"] = [labels.get(p, ("rl", p))[1] for p in front["policy"]]
    front["pareto"] = pareto_front(front, X, Y)
    baselines = front["family"] != "rl"
    front["undominated_by_baselines"] = undominated_by(front, baselines, X, Y)
    order = front["family"].map({family: i for i, family in enumerate(FRONT_FAMILIES)})
    front = front.assign(_order=order).sort_values(["_order", X], kind="stable")
    front = front.drop(columns="_order")
    return front.reset_index(drop=True)


def to_markdown(front: pd.DataFrame) -> str:
    """``front.md``'s table, from ``front.csv`` read back."""
    return markdown_from_frame(front, FRONT_COLUMNS)


def main(args: Args) -> Path:
    """Play every baseline the run folder lacks live, then write the front, table and plot."""
    folder = args.run_folder()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    kwargs = {} if args.max_perturbation is None else {"max_perturbation": args.max_perturbation}
    live = gym.make(
        args.env_id,
        method=args.method,
        split="eval",
        backend="live",
        max_windows=args.eval_windows,
        device=args.device,
        **kwargs,
    )
    windows = list(range(live.unwrapped.n_windows))
    full_flops = float(
        live.unwrapped.backend_flops_full_per_layer().sum() * live.unwrapped.n_layers
    )
    policies = baseline_policies(live, args)
    agents = None
    if args.agents_csv is not None:
        agents = agent_rows(args.agents_csv, live, args.method, windows)
    config = live.unwrapped.config.as_dict()
    env = {k: v for k, v in config.items() if k != "cache_dir"}
    out = folder.prepare(asdict(args), env=env, windows=windows, torch=torch.__version__)

    log = RowLog(out / "per_window.csv", KEY)
    counts = log.counts()
    done = {key for key in counts if counts[key] == len(windows)}
    log.retain(done)  # the rows of a baseline cut short are played again
    todo = {name: p for name, p in policies.items() if log.key_of({"policy": name}) not in done}
    with Progress(console=console) as progress:
        task = progress.add_task(f"{args.method}: baselines on eval windows", total=len(todo))
        for name, (_, _, policy) in todo.items():
            frame = evaluate_policy_on_windows(policy, live, windows, name=name)
            log.append(
                frame.assign(
                    seed=0, kind="baseline", method=args.method, attention_flops_full=full_flops
                )
            )
            progress.advance(task)
    live.close()
    per_window = log.sorted_by([{"policy": name} for name in policies])
    log.rewrite(per_window)
    per_window = read_csv(out / "per_window.csv")
    if agents is not None:
        per_window = pd.concat([per_window, agents], ignore_index=True)

    labels = {name: (family, label) for name, (family, label, _) in policies.items()}
    front = front_table(per_window, labels)
    front.to_csv(out / "front.csv", index=False)
    header = (
        f"{args.env_id}, method {args.method}, live backend, {len(windows)} eval windows; "
        f"Δ ppl: perplexity increase over full rank; FLOPs reduction: executed attention FLOPs "
        f"(basis search included) saved vs full rank; guardrail max_perturbation="
        f"{config['max_perturbation']}. non-dominated: no other row is as good on both axes "
        "and better on one; beyond baselines: no static-rank or energy-threshold row is.\n\n"
    )
    (out / "front.md").write_text(header + to_markdown(pd.read_csv(out / "front.csv")))
    front_plot(front, out / "pareto.png", f"{args.env_id}, method {args.method}")
    wall_s = time.perf_counter() - start
    folder.update_config(wall_s=wall_s, threads=torch.get_num_threads())
    console.print((out / "front.md").read_text())
    console.print(f"wrote {out} in {wall_s:.0f} s")
    return out


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

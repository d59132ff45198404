"""The Pareto front of static ranks and energy thresholds, with RL agents on the same axes.

On the held-out eval windows, live backend (closed loop, real perplexity), every static rank
of the grid (and full rank) and a sweep of energy thresholds are played; each point is the
executed attention-FLOPs reduction against the perplexity increase over full rank. An
adaptive policy is worth its training only where it lies beyond this front. With
``--agents-csv`` (the ``per_window.csv`` of an ``experiments/compare_agents.py`` run) the
RL agents of the same method are placed on the same axes.

Writes under ``out_dir/<method>/``: ``per_window.csv`` (the baselines' leaderboard rows,
replayable), ``front.csv`` (one row per policy, ``pareto``: non-dominated among all rows,
``undominated_by_baselines``: no static-rank or energy point dominates it), ``front.md``
(generated from ``front.csv``), ``pareto.png`` and ``config.json``.

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
from harness.reporting import (
    FRONT_FAMILIES,
    front_plot,
    markdown_from_frame,
    pareto_front,
    summary_table,
    undominated_by,
)

console = Console()

X, Y = "flops_reduction_pct", "delta_ppl_pct"
PROBLEM_FIELDS = ("model", "corpus", "split", "eval_fraction", "seq_len", "segment_length")
"""Env fields an agents CSV must share with the front (besides the method) to be comparable."""

FRONT_COLUMNS = (
    ("family", "family", "{}"),
    ("policy", "policy", "{}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("Δ ppl vs full", "delta_ppl_pct", "{:+.2f} %"),
    ("FLOPs reduction", "flops_reduction_pct", "{:.1f} %"),
    ("attention GFLOPs", "attention_gflops", "{:.3f}"),
    ("mean rank", "mean_rank", "{:.1f}"),
    ("fidelity", "mean_fidelity", "{:.3f}"),
    ("non-dominated", "pareto", "{}"),
    ("beyond baselines", "undominated_by_baselines", "{}"),
    ("seeds × windows", "size", "{}"),
)
"""``(header, front.csv column, format)`` of ``front.md``."""


@dataclass(frozen=True)
class Args:
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
    out_dir: Path = Path("results/pareto")
    """Parent folder; files go to ``out_dir/<method>/``."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device of the model (cuda when present, else cpu)."""
    threads: int = 2
    """Torch threads."""


def baseline_policies(env: gym.Env, args: Args) -> dict[str, tuple[str, str, object]]:
    """Name -> (family, label, policy) of full rank, the static ranks and the thresholds."""
    grid = env.unwrapped.actions
    policies = {"full_rank": ("static", str(grid.head_dim), make_baseline("full_rank", env))}
    if args.static_ranks is None:
        settings = grid.settings[:-1]  # every action but exact attention
    else:
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
        ValueError: No RL row of ``method``, or the rows come from another model, data or
            segmentation.
    """
    frame = read_csv(path)
    frame = frame[(frame["kind"] == "rl") & (frame["method"] == method)].copy()
    if frame.empty:
        raise ValueError(f"{path} holds no RL rows of method {method!r}")
    frame["seed"] = frame["seed"].astype(int)
    frame["attention_flops_full"] = frame["attention_flops_full"].astype(float)
    ours = json.loads(config_json(env))
    for text in frame["env_config"].unique():
        theirs = json.loads(text)
        different = [k for k in PROBLEM_FIELDS if theirs.get(k) != ours.get(k)]
        if different:
            raise ValueError(
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
    out = args.out_dir / args.method
    out.mkdir(parents=True, exist_ok=True)

    policies = baseline_policies(live, args)
    frames = []
    with Progress(console=console) as progress:
        task = progress.add_task(f"{args.method}: baselines on eval windows", total=len(policies))
        for name, (_, _, policy) in policies.items():
            frame = evaluate_policy_on_windows(policy, live, windows, name=name)
            frames.append(frame.assign(seed=0, kind="baseline"))
            progress.advance(task)
    per_window = pd.concat(frames, ignore_index=True).assign(
        method=args.method, attention_flops_full=full_flops
    )
    per_window.to_csv(out / "per_window.csv", index=False)
    if args.agents_csv is not None:
        agents = agent_rows(args.agents_csv, live, args.method, windows)
        per_window = pd.concat([per_window, agents], ignore_index=True)

    labels = {name: (family, label) for name, (family, label, _) in policies.items()}
    front = front_table(per_window, labels)
    front.to_csv(out / "front.csv", index=False)
    config = live.unwrapped.config.as_dict()
    header = (
        f"{args.env_id}, method {args.method}, live backend, {len(windows)} eval windows; "
        f"Δ ppl: perplexity increase over full rank; FLOPs reduction: executed attention FLOPs "
        f"(basis search included) saved vs full rank; guardrail max_perturbation="
        f"{config['max_perturbation']}. non-dominated: no other row is as good on both axes "
        "and better on one; beyond baselines: no static-rank or energy-threshold row is.\n\n"
    )
    (out / "front.md").write_text(header + to_markdown(pd.read_csv(out / "front.csv")))
    front_plot(front, out / "pareto.png", f"{args.env_id}, method {args.method}")
    run = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "env": {k: v for k, v in config.items() if k != "cache_dir"},
        "windows": windows,
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "config.json").write_text(json.dumps(run, indent=2) + "\n")
    console.print((out / "front.md").read_text())
    console.print(f"wrote {out} in {run['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Compare RL agents and baselines on held-out text: the measured version of the paper's Table 1.

The engine of ``experiments/compare_agents.py`` and ``experiments/budget_frontier.py``. For
each method: train every algorithm x policy x seed on the train windows (cached backend,
``n_envs`` copies), then evaluate each agent and every baseline on the same held-out eval
windows with the live backend (closed loop, real perplexity). One trial (method x agent x
seed: train, then evaluate) is one call of :func:`run_trial`, run here or as a Ray task
(``executor="ray"``). Writes under ``<out_dir>/<run name>/``: per-policy leaderboard CSVs
(replayable), ``per_window.csv`` (appended as each trial or baseline finishes),
``summary.csv``, ``table.md`` (generated from the CSV), ``pareto.png``, ``config.json``, the
models and TensorBoard logs.

An existing run folder is refused unless ``overwrite`` (start again, empty) or ``resume``
(keep finished trials and baselines, run the rest; the arguments that change results must
equal those in its ``config.json``). A budgeted env (``budget``) gets the budget baselines
of :mod:`agents.budget_baselines` instead of the static ranks and thresholds.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import Progress

import drrl_env
from agents.baseline_registry import Baseline, BaselineContext
from agents.callbacks import RankMetricsCallback
from agents.curves import LearningCurveCallback, plot_curves, read_curves
from agents.evaluation import (
    COLUMNS,
    evaluate_policy_on_windows,
    full_attention_flops,
    write_csv,
)
from agents.factory import ALGOS, POLICIES, make_agent, save_agent
from drrl_env.inspect import env_config
from drrl_env.methods import method_names
from drrl_env.rewards import RewardWeights
from harness.reporting import pareto_plot, summary_table, window_groups, write_markdown
from harness.runs import (
    ArgumentError,
    RowLog,
    RunFolder,
    check_device,
    check_executor,
    check_run_name,
    check_seeds,
    check_unique,
    execute,
    field_defaults,
    unsaved_models_note,
    write_atomic,
)

console = Console()

KEY = ("method", "kind", "policy", "seed")
"""Columns of ``per_window.csv`` that identify one trial or baseline."""
NOT_RESULTS = ("out_dir", "run_name", "overwrite", "resume", "executor", "address")
NOT_RESULTS += ("ray_num_cpus", "threads")
"""Arguments a resumed run may change: they do not change which numbers are computed."""
FORWARDED_ENV = ("DRRL_CACHE_DIR", "DRRL_DATA_DIR")
"""Environment variables the Ray workers get from this process, when set."""


@dataclass(frozen=True)
class Args:
    env_id: str = "DRRL-Mix-TopP-Budget-v0"
    """Registered environment id (its model, data, segments and method)."""
    methods: tuple[str, ...] | None = None
    """Attention methods compared (each gets its own table); unset: the id's own method."""
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
    """Training steps per agent and seed (all envs together)."""
    train_windows: int = 12
    """Train-split windows in the cached training env (a multiple of 3 keeps a mix's kinds
    balanced)."""
    eval_windows: int = 12
    """Held-out eval windows every policy is evaluated on."""
    seq_len: int | None = None
    """Tokens per window; unset: the id's own."""
    segment_length: int | None = None
    """Tokens per segment (it divides seq_len); unset: the id's own."""
    static_ranks: tuple[int, ...] | None = None
    """Static-rank baselines of an unbudgeted env (ranks of the env's grid); unset: every
    rank of the grid below full."""
    energy_taus: tuple[float, ...] = (0.95,)
    """Energy thresholds of the adaptive-SVD baseline, each in (0, 1]."""
    quick: bool = False
    """The configuration of ``make run``: see :data:`QUICK`."""
    full: bool = False
    """The larger configuration: see :data:`FULL`."""
    n_envs: int = 1
    """Copies of the cached training env per agent (SubprocVecEnv when > 1)."""
    out_dir: str = "results"
    """Parent folder of the run folder."""
    run_name: str | None = None
    """Run folder name inside out_dir; default ``{env}__compare_agents__{seed}__{time}``."""
    overwrite: bool = False
    """Delete an existing run folder's content and start again."""
    resume: bool = False
    """Keep an existing run's finished trials and baselines and run the rest."""
    executor: Literal["local", "ray"] = "local"
    """Where trials run: in this process, or as Ray tasks (``pip install 'drrl-gym[ray]'``)."""
    address: str | None = None
    """Ray cluster address (``ray start --head`` prints it); unset starts a local instance."""
    ray_num_cpus: int | None = None
    """CPUs of the local Ray instance started when --address is unset (default: all)."""
    alpha: float = RewardWeights.alpha
    """Reward weight of attention fidelity (training and evaluation envs)."""
    beta: float | None = None
    """Reward weight of the executed-FLOPs ratio (unset: the env's default, 0.5; must stay
    unset for a budgeted env)."""
    gamma: float | None = None
    """Reward weight of the rank-change perturbation (unset: the env's default, 0.1)."""
    budget: float | None = None
    """FLOPs budget of every episode, a fraction of exact attention's (unset: the env id's
    own, none for unbudgeted ids); budgeted runs get the budget baselines."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device of the frozen model (cuda when present, else cpu)."""
    threads: int = 2
    """Torch threads (per trial)."""

    def __post_init__(self) -> None:
        if self.env_id not in drrl_env.ENV_IDS:
            raise ArgumentError(
                f"env_id: {self.env_id!r} is not a registered DRRL id; registered: "
                f"{', '.join(drrl_env.ENV_IDS)}"
            )
        if self.quick and self.full:
            raise ArgumentError("quick and full exclude each other")
        for method in self.methods or ():
            if method not in method_names():
                raise ArgumentError(
                    f"methods: {method!r} is not a registered method; methods: "
                    f"{', '.join(method_names())}"
                )
        for spec in self.agents:
            algo, policy = parse_agent(spec)
            if algo not in ALGOS or policy not in POLICIES:
                raise ArgumentError(
                    f"agents: {spec!r} is not algo:policy with algo in {tuple(ALGOS)} "
                    f"and policy in {POLICIES}"
                )
        check_unique("methods", self.methods or ())
        check_unique("agents", [":".join(parse_agent(spec)) for spec in self.agents])
        check_seeds("seeds", self.seeds)
        for name in ("total_timesteps", "train_windows", "eval_windows", "threads", "n_envs"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "segment_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        for rank in self.static_ranks or ():
            if rank < 1:
                raise ArgumentError(f"static_ranks: {rank} is not a rank (>= 1)")
        check_unique("static_ranks", self.static_ranks or ())
        for tau in self.energy_taus:
            if not 0 < tau <= 1:
                raise ArgumentError(f"energy_taus: {tau!r} is outside (0, 1]")
        check_unique("energy_taus", [f"{tau:g}" for tau in self.energy_taus])
        for method in self.resolved().methods:  # weights, budget, shape, method: as the env
            try:
                env_config(self.env_id, **{**self.env_kwargs(method), "device": "cpu"})
            except ValueError as error:
                raise ArgumentError(str(error)) from None
        check_device(self.device)
        check_executor(self.executor, self.address, self.ray_num_cpus)
        if self.run_name is not None:
            check_run_name(self.run_name)
        if self.resume and self.run_name is None:
            raise ArgumentError(
                "resume needs run_name: the default name holds the start time, so it never "
                "names an earlier run"
            )
        if self.overwrite and self.resume:
            raise ArgumentError("overwrite and resume exclude each other")

    def env_kwargs(self, method: str) -> dict:
        """``gym.make`` keywords shared by the training and evaluation envs of ``method``."""
        weights = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}
        weights["budget"] = self.budget
        weights["seq_len"] = self.seq_len
        weights["segment_length"] = self.segment_length
        weights = {name: value for name, value in weights.items() if value is not None}
        return {"method": method, "device": self.device, **weights}

    def resolved(self) -> Args:
        """These arguments with the preset (``quick`` or ``full``) applied to the fields left
        at their defaults, and ``methods`` set (the id's own method when unset)."""
        preset = QUICK if self.quick else FULL if self.full else {}
        defaults = {field.name: field.default for field in fields(self)}
        changes = {
            name: value
            for name, value in preset.items()
            if getattr(self, name) == defaults[name] != value
        }
        if self.methods is None:
            try:
                changes["methods"] = (env_config(self.env_id, device="cpu").method,)
            except ValueError as error:
                raise ArgumentError(str(error)) from None
        if not changes:
            return self
        return replace(self, **changes)


QUICK: dict[str, Any] = {
    "seq_len": 512,
    "segment_length": 128,
    "budget": 0.6,
    "train_windows": 6,
    "eval_windows": 6,
    "total_timesteps": 20_000,
}
"""``--quick``, what ``make run`` runs: 512-token windows in 4 segments of 128 tokens (120
steps an episode with SmolLM2's 30 layers), a budget of 0.6 (the floor of ``topp`` at this
length is 0.35), 2 train and 2 eval windows of each kind of a mix, 20,000 training steps.
Sized so that a first run on an empty cache fits in 15 minutes on 2 CPU cores."""
FULL: dict[str, Any] = {
    "seeds": (0, 1, 2),
    "total_timesteps": 100_000,
    "train_windows": 24,
    "eval_windows": 24,
    "energy_taus": (0.9, 0.95),
}
"""``--full``: 3 seeds, 100,000 steps, 24 train and 24 eval windows, two energy thresholds."""


@dataclass(frozen=True)
class Trial:
    """One method x agent x seed: trained, then evaluated on the eval windows."""

    method: str
    agent: str
    seed: int

    @property
    def policy(self) -> str:
        """The ``policy`` column of its rows: ``algo_policy``."""
        algo, policy = parse_agent(self.agent)
        return f"{algo}_{policy}"

    @property
    def run_id(self) -> str:
        """Its TensorBoard run and model file name."""
        return f"{self.method}__{self.policy}__{self.seed}"


def parse_agent(spec: str) -> tuple[str, str]:
    algo, _, policy = spec.partition(":")
    return algo, policy or "mlp"


def training_env(args: Args, method: str, seed: int):
    """``args.n_envs`` copies of the cached train env (SubprocVecEnv when more than one)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    # The module-qualified id lets worker processes that never imported drrl_env find it.
    factory = functools.partial(
        gym.make,
        f"drrl_env:{args.env_id}",
        split="train",
        max_windows=args.train_windows,
        **args.env_kwargs(method),
    )
    vec_env_cls = SubprocVecEnv if args.n_envs > 1 else DummyVecEnv
    return make_vec_env(factory, n_envs=args.n_envs, seed=seed, vec_env_cls=vec_env_cls)


def eval_env(args: Args, method: str) -> gym.Env:
    """The live eval env of ``method`` (closed loop, perplexity)."""
    return gym.make(
        args.env_id,
        split="eval",
        backend="live",
        max_windows=args.eval_windows,
        **args.env_kwargs(method),
    )


def run_trial(trial: Trial, args: Args) -> dict[str, Any]:
    """Train one agent on the cached train env and evaluate it on the live eval windows.

    Runs from plain, picklable arguments (here or in a Ray worker) and writes nothing into
    the run folder: the caller writes what it returns.

    Returns:
        ``rows`` (the per-window rows, ``per_window.csv`` columns), ``curve`` (the learning
        curve rows, :func:`learning_curve`, labelled with method, policy and seed),
        ``model_zip`` (the saved agent), ``tensorboard`` (relative path -> bytes of its
        TensorBoard files) and ``train_s`` (training, learning curve included).
    """
    torch.set_num_threads(args.threads)
    algo, policy = parse_agent(trial.agent)
    with tempfile.TemporaryDirectory(prefix="drrl-trial-") as scratch:
        board = Path(scratch) / "tensorboard"
        started = time.perf_counter()
        curve = learning_curve(args, trial.method)
        env = training_env(args, trial.method, trial.seed)
        try:
            model = make_agent(algo, env, policy, seed=trial.seed, tensorboard_log=board)
            callbacks = [RankMetricsCallback(), curve]
            model.learn(args.total_timesteps, callback=callbacks, tb_log_name=trial.run_id)
            train_s = time.perf_counter() - started
            model_zip = save_agent(model, Path(scratch) / "model").read_bytes()
        finally:
            env.close()
            curve.eval_env.close()
        live = eval_env(args, trial.method)
        try:
            windows = list(range(live.unwrapped.n_windows))
            frame = evaluate_policy_on_windows(model, live, windows, name=trial.policy)
            flops = full_attention_flops(live)
        finally:
            live.close()
        files = {
            path.relative_to(board).as_posix(): path.read_bytes()
            for path in sorted(board.rglob("*"))
            if path.is_file()
        }
    rows = frame.assign(seed=trial.seed, kind="rl", method=trial.method)
    rows = rows.assign(attention_flops_full=flops)
    labels = {"method": trial.method, "policy": trial.policy, "seed": trial.seed}
    return {
        "rows": rows.to_dict("records"),
        "curve": [{**labels, **row} for row in curve.history],
        "model_zip": model_zip,
        "tensorboard": files,
        "train_s": train_s,
    }


CURVE_POINTS = 10
"""Evaluations of a trial's learning curve besides the one at the start."""
CURVE_BASELINES = (Baseline.of("full_rank"), Baseline.of("greedy_oracle"))
"""Baselines drawn next to the learning curves of an unbudgeted env."""
BUDGET_CURVE_BASELINES = tuple(
    Baseline.of(name) for name in ("static_allocation", "lagrangian_greedy", "dp_optimum")
)
"""Baselines drawn next to the learning curves of a budgeted env."""


def learning_curve(args: Args, method: str) -> LearningCurveCallback:
    """The learning curve of a trial: every ``total_timesteps // CURVE_POINTS`` steps, the
    agent's return on the eval windows of the cached env (the held-out windows of the table,
    teacher-forced), beside :data:`CURVE_BASELINES` (:data:`BUDGET_CURVE_BASELINES` when
    budgeted) on the same windows."""
    env = cached_env(args, method, "eval")
    windows = list(range(env.unwrapped.n_windows))
    has_budget = env.unwrapped.config.budget is not None
    refs = BUDGET_CURVE_BASELINES if has_budget else CURVE_BASELINES
    baselines = {ref.label: baseline_policy(ref, env, args, method, windows) for ref in refs}
    every = max(args.total_timesteps // CURVE_POINTS, 1)
    return LearningCurveCallback(env, windows, every, baselines=baselines)


def write_trial(run_dir: Path, log: RowLog, trial: Trial, result: dict[str, Any]) -> None:
    """Write a finished trial: model, TensorBoard files, learning curve
    (``curves/<run_id>.csv``), leaderboard CSV, then its log rows."""
    write_atomic(run_dir / "models" / f"{trial.run_id}.zip", result["model_zip"])
    curve = pd.DataFrame(result["curve"]).to_csv(index=False)
    write_atomic(run_dir / "curves" / f"{trial.run_id}.csv", curve)
    board = run_dir / "tensorboard"
    for stale in board.glob(f"{trial.run_id}_*"):  # left by a write cut short
        shutil.rmtree(stale)
    for relative, data in result["tensorboard"].items():
        write_atomic(board / relative, data)
    rows = pd.DataFrame(result["rows"])
    write_leaderboard(run_dir, rows, f"{trial.policy}__{trial.seed}")
    log.append(rows)  # last: the rows mark the trial finished


def write_leaderboard(run_dir: Path, rows: pd.DataFrame, stem: str) -> None:
    """The replayable per-policy CSV (leaderboard columns) of one method, written atomically."""
    method = rows["method"].iloc[0]
    path = run_dir / "leaderboard" / method / f"{stem}.csv"
    partial = path.with_name(f".{path.name}.partial")
    write_csv(rows[list(COLUMNS)], partial)
    os.replace(partial, path)


def rank_grids(args: Args) -> dict[str, tuple[int, ...]]:
    """Each method's rank grid (loads the model, builds no rollouts); checks static ranks.

    Raises:
        ArgumentError: A static rank is not in the grid.
    """
    from drrl_env.inspect import attention_shape

    grids = {}
    for method in args.methods:
        config, shape = attention_shape(args.env_id, **args.env_kwargs(method))
        grids[method] = config.rank_grid(shape.head_dim)
        outside = [rank for rank in args.static_ranks or () if rank not in grids[method]]
        if outside:
            raise ArgumentError(
                f"static_ranks: {outside} not in the rank grid {list(grids[method])} of "
                f"{args.env_id} (method {method})"
            )
    return grids


BUDGET_BASELINES = tuple(
    Baseline.of(name)
    for name in (
        "full_rank",
        "best_uniform",
        "static_allocation",
        "lagrangian_greedy",
        "dp_optimum",
        "uniform_random",
    )
)
"""Baselines of a budgeted run (``full_rank`` asks for exact attention; the wall decides)."""


def budgeted(args: Args, method: str) -> bool:
    """Whether the envs of ``method`` have a FLOPs budget."""
    return (
        env_config(args.env_id, **{**args.env_kwargs(method), "device": "cpu"}).budget is not None
    )


def baseline_refs(args: Args, grid: tuple[int, ...], method: str | None = None) -> list[Baseline]:
    """The baselines of one method, in table order (registered names with parameters)."""
    if method is not None and budgeted(args, method):
        return list(BUDGET_BASELINES)
    return _unbudgeted_baselines(args.static_ranks, args.energy_taus, grid)


def _unbudgeted_baselines(
    static_ranks: Sequence[int] | None, energy_taus: Sequence[float], grid: Sequence[int]
) -> list[Baseline]:
    ranks = grid[:-1] if static_ranks is None else static_ranks
    return [
        Baseline.of("full_rank"),
        *(Baseline.of("static_rank", rank=int(rank)) for rank in ranks),
        *(Baseline.of("energy_threshold", tau=float(tau)) for tau in energy_taus),
        Baseline.of("uniform_random", seed=0),
        Baseline.of("greedy_oracle"),
    ]


RUN_ARGS = ("methods", "agents", "seeds", "static_ranks", "energy_taus")
"""The arguments in a run's ``config.json`` that say which rows it holds."""


def planned_keys(
    recorded: Mapping[str, Any], method: str, grid: Sequence[int], budgeted: bool
) -> set[tuple[str, str, int]]:
    """``(kind, policy, seed)`` of every trial and baseline of ``method`` in a run.

    Args:
        recorded: The run's arguments, as its ``config.json`` records them (``args``).
        method: One of the run's methods.
        grid: The rank grid of the method's env (for ``static_ranks=None``).
        budgeted: Whether the method's env has a FLOPs budget (budget baselines).

    Raises:
        ValueError: ``recorded`` lacks one of :data:`RUN_ARGS` or holds a malformed one.
    """
    missing = [name for name in RUN_ARGS if name not in recorded]
    if missing:
        raise ValueError(f"the run's arguments lack {missing}: not a compare_agents run")
    try:
        keys = {
            ("rl", "_".join(parse_agent(str(spec))), int(seed))
            for spec in recorded["agents"]
            for seed in recorded["seeds"]
        }
        refs = (
            BUDGET_BASELINES
            if budgeted
            else _unbudgeted_baselines(recorded["static_ranks"], recorded["energy_taus"], grid)
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"the run's arguments are malformed: {error}") from None
    return keys | {("baseline", ref.label, 0) for ref in refs}


def cached_env(args: Args, method: str, split: str) -> gym.Env:
    """The cached env of ``method`` on the train windows or the eval windows."""
    windows = args.train_windows if split == "train" else args.eval_windows
    return gym.make(args.env_id, split=split, max_windows=windows, **args.env_kwargs(method))


def baseline_policy(ref: Baseline, env: gym.Env, args: Args, method: str, windows: list[int]):
    """Build the baseline ``ref`` for the env it acts in (the live eval env, or a cached one).

    Baselines fitted on measurements read the cached train windows; those that look up every
    action (the greedy oracle, the Lagrangian greedy, the optimum) pick their schedules on
    the cached eval windows and ``env`` replays them.
    """
    context = BaselineContext(
        env,
        train=lambda: cached_env(args, method, "train"),
        held_out=lambda: cached_env(args, method, "eval"),
        windows=windows,
    )
    return ref.build(context)


@dataclass(frozen=True)
class Entry:
    """One unit of work of a run: a trial, or a baseline evaluated on one method's windows."""

    method: str
    kind: Literal["rl", "baseline"]
    policy: str
    seed: int = 0
    trial: Trial | None = None
    baseline: Baseline | None = None

    @property
    def key(self) -> dict[str, Any]:
        """Its values of the :data:`KEY` columns."""
        return {"method": self.method, "kind": self.kind, "policy": self.policy, "seed": self.seed}

    def files(self, run_dir: Path) -> list[Path]:
        """The files a finished entry has written besides its rows.

        A trial's model is not among them: a folder of committed results holds no
        ``models/`` (nor ``tensorboard/``), and its rows, leaderboard CSV and learning
        curve are everything the tables are made from, so it resumes without training.
        """
        stem = self.policy if self.trial is None else f"{self.policy}__{self.seed}"
        paths = [run_dir / "leaderboard" / self.method / f"{stem}.csv"]
        if self.trial is not None:
            paths.append(run_dir / "curves" / f"{self.trial.run_id}.csv")
        return paths

    def model(self, run_dir: Path) -> Path | None:
        """The saved agent of a trial (None for a baseline)."""
        return None if self.trial is None else run_dir / "models" / f"{self.trial.run_id}.zip"


def plan(args: Args, grids: dict[str, tuple[int, ...]]) -> list[Entry]:
    """Every entry of the run in table order: per method, the trials, then the baselines."""
    entries = []
    for method in args.methods:
        for spec in args.agents:
            for seed in args.seeds:
                trial = Trial(method, spec, seed)
                entries.append(Entry(method, "rl", trial.policy, seed, trial))
        refs = baseline_refs(args, grids[method], method)
        entries += [Entry(method, "baseline", ref.label, baseline=ref) for ref in refs]
    return entries


def finished(log: RowLog, run_dir: Path, entries: list[Entry], n_windows: dict[str, int]) -> set:
    """Keys of the entries whose rows (one per eval window) and files are all written."""
    counts = log.counts()
    return {
        log.key_of(entry.key)
        for entry in entries
        if counts.get(log.key_of(entry.key)) == n_windows[entry.method]
        and all(path.is_file() for path in entry.files(run_dir))
    }


def main(args: Args) -> Path:
    """Validate everything, open the run folder, run what is not finished, write the tables."""
    args = args.resolved()
    stamp = int(time.time())
    run_name = args.run_name or f"{args.env_id}__compare_agents__{args.seeds[0]}__{stamp}"
    folder = RunFolder(
        Path(args.out_dir) / run_name,
        overwrite=args.overwrite,
        resume=args.resume,
        ignored=NOT_RESULTS,
        defaults=field_defaults(Args),
    )
    folder.check(asdict(args))  # before loading anything
    torch.set_num_threads(args.threads)
    grids = rank_grids(args)
    folder.prepare(asdict(args), torch=torch.__version__)
    try:
        return run(args, folder, plan(args, grids))
    except KeyboardInterrupt:
        console.print(
            f"interrupted: finished trials and baselines are kept in {folder.path}; rerun "
            f"with --run-name {run_name} --resume to run the rest"
        )
        raise


def run(args: Args, folder: RunFolder, entries: list[Entry]) -> Path:
    """Run the entries the folder does not hold yet, then the tables from ``per_window.csv``."""
    run_dir, start = folder.path, time.perf_counter()
    log = RowLog(run_dir / "per_window.csv", KEY)
    lives = {method: eval_env(args, method) for method in args.methods}
    n_windows = {method: live.unwrapped.n_windows for method, live in lives.items()}
    done = finished(log, run_dir, entries, n_windows)
    dropped = log.retain(done)  # rows of an entry cut short are run again
    todo = [entry for entry in entries if log.key_of(entry.key) not in done]
    if folder.resuming:
        console.log(
            f"resuming {run_dir}: {len(entries) - len(todo)} of {len(entries)} trials and "
            f"baselines finished ({dropped} rows of unfinished ones dropped)"
        )
        unsaved = [
            e.trial.run_id
            for e in entries
            if e.trial is not None and log.key_of(e.key) in done and not e.model(run_dir).is_file()
        ]
        if note := unsaved_models_note("trials", unsaved):
            console.log(note)
    with Progress(console=console) as progress:
        run_trials(args, [e.trial for e in todo if e.trial is not None], log, run_dir, progress)
        for method, live in lives.items():
            refs = [e.baseline for e in todo if e.method == method and e.trial is None]
            run_baselines(args, method, live, refs, log, run_dir, progress)
    first = next(iter(lives.values()))  # every method reads the same windows of env_id
    groups = window_groups(first, max(n_windows.values()))
    for live in lives.values():
        live.close()
    per_window = log.sorted_by([entry.key for entry in entries])
    log.rewrite(per_window)
    write_tables(run_dir, per_window, groups)
    wall_s = time.perf_counter() - start
    folder.update_config(wall_s=wall_s, threads=torch.get_num_threads(), executor=args.executor)
    console.print((run_dir / "table.md").read_text())
    console.print(f"wrote {run_dir} in {wall_s:.0f} s")
    return run_dir


def run_trials(
    args: Args, trials: list[Trial], log: RowLog, run_dir: Path, progress: Progress
) -> None:
    """Run the trials on ``args.executor``; write each one as it finishes."""
    if not trials:
        return
    for method in dict.fromkeys(trial.method for trial in trials):  # train caches, built once
        train_kwargs = {"split": "train", "max_windows": args.train_windows}
        gym.make(args.env_id, **train_kwargs, **args.env_kwargs(method)).close()
    bar = progress.add_task(f"trials ({args.executor})", total=len(trials))
    results = execute(
        functools.partial(run_trial, args=args),
        trials,
        args.executor,
        address=args.address,
        num_cpus=args.ray_num_cpus,
        cpus_per_task=max(args.threads, args.n_envs),
        env_vars={name: os.environ[name] for name in FORWARDED_ENV if name in os.environ},
    )
    for trial, result in results:
        write_trial(run_dir, log, trial, result)
        progress.console.log(
            f"{trial.method}: {trial.agent} seed {trial.seed} trained "
            f"({args.total_timesteps:,} steps) in {result['train_s']:.0f} s and evaluated"
        )
        progress.advance(bar)


def run_baselines(
    args: Args,
    method: str,
    live: gym.Env,
    refs: list[Baseline],
    log: RowLog,
    run_dir: Path,
    progress: Progress,
) -> None:
    """Evaluate the baselines ``refs`` of ``method``; write each one as it finishes."""
    if not refs:
        return
    windows = list(range(live.unwrapped.n_windows))
    flops = full_attention_flops(live)
    bar = progress.add_task(f"{method}: baselines", total=len(refs))
    for ref in refs:
        policy = baseline_policy(ref, live, args, method, windows)
        frame = evaluate_policy_on_windows(policy, live, windows, name=ref.label)
        rows = frame.assign(seed=0, kind="baseline", method=method, attention_flops_full=flops)
        write_leaderboard(run_dir, rows, ref.label)
        log.append(rows)
        progress.advance(bar)


def write_tables(run_dir: Path, per_window: pd.DataFrame, groups: np.ndarray | None = None) -> None:
    """``summary.csv``, ``table.md`` and ``pareto.png`` from the per-window rows, and
    ``learning_curves.png`` from the curves of the trials among them (``curves/*.csv``).
    ``groups``: each window's text group (:func:`harness.reporting.window_groups`), resampled
    together by the intervals; None: every window apart."""
    summary = summary_table(per_window, groups)
    summary.to_csv(run_dir / "summary.csv", index=False)
    write_markdown(summary, run_dir / "table.md")
    pareto_plot(summary, run_dir / "pareto.png")
    curves = read_curves(run_dir / "curves")
    if curves.empty:
        return
    trials = per_window.loc[per_window["kind"] == "rl", ["method", "policy", "seed"]]
    curves = trials.drop_duplicates().merge(curves, on=["method", "policy", "seed"])
    if not curves.empty:  # the curves of the table's trials, in its order
        plot_curves(curves, run_dir / "learning_curves.png")

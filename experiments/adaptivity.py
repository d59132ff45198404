"""The headroom table: does choosing per window beat the best static allocation, and where?

For each budget (a cap on an episode's executed attention FLOPs, as a fraction of exact
attention's), the schedules of :mod:`agents.allocations` are fitted on the cached train
windows (teacher forced: every action's fidelity and realised FLOPs at every cell; all
kinds together by default, each kind apart with ``--fit-per-kind``) and played closed loop
on the held-out windows of each kind of text (``prose``, ``code``, ``passkey``, and all of
them: ``mix``), on the live backend, against the exact model on the same window:

- ``uniform``: the best single action; ``global_p``: the training-free top-p rule (one
  rank, the largest mass target that meets the budget); ``static_layer``: the best
  per-layer allocation (exact knapsack); ``random_search`` and ``greedy_search``: per-layer
  allocations found with ``--evaluations`` evaluations each;
- ``per_window_optimum``: the exact knapsack on the eval window's own cached values and
  costs (not deployable: the ceiling of what adaptivity can buy).

Each row holds the mean token KL to exact attention, top-1 agreement, the change of
perplexity, retrieval accuracy (passkey windows), the live FLOPs ratio, all with 95 %
bootstrap intervals over windows, and the paired difference of KL against
``static_layer`` with its interval: a difference whose interval contains 0 reads "no
difference". Windows that share text (a mix's passkey window and the prose window that is
its filler; the needles of one filler window with ``passkey:needles=N``) are resampled
together (:meth:`~drrl_env.data.sources.Source.text_groups`). The ``topp`` method sets one
(rank, p) per layer call for all heads, so there is no per-(layer, kv head) allocation to
fit. The agents of ``compare_agents`` are not part
of this table.

Writes ``episodes.csv`` (one row per live episode, appended as each finishes: ``--resume``
skips the finished ones), ``headroom.csv``, ``headroom.md`` (generated from the CSV) and
``headroom.png`` under ``<out_dir>/<run_name>``. A resumed run may name more eval windows,
other budgets, kinds or policies (:data:`GROWABLE`: a finished episode does not depend on
them): it plays only the episodes it lacks, and the tables cover what this call names
(``config.json``: ``table_covers``). Every other argument must match the run's. It plays the
deployable schedules its episodes recorded (their ``actions``; a schedule its notes say could
not be fitted stays left out), so a resume needs the train
windows' cache only for a schedule not played yet (a new budget, kind or policy), and the
eval windows' cache only when an episode is left to play: with none left, a resume rebuilds
the tables from ``episodes.csv``.

    python experiments/adaptivity.py                                 # mix at 1024 tokens
    python experiments/adaptivity.py --env-id DRRL-Long-Mix-TopP-v0 --budgets 0.3 0.2
    python experiments/adaptivity.py --train-windows 6 --eval-windows 6 --resume
    python experiments/adaptivity.py --eval-corpus passkey --eval-windows 24   # retrieval
    python experiments/adaptivity.py --eval-windows 48 --resume   # 24 more held-out windows
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

from agents.allocations import (
    Problem,
    best_uniform,
    global_mass_rule,
    greedy_search,
    measurements,
    per_window_optimum,
    random_search,
    static_per_layer,
)
from drrl_env.data import corpus_names
from drrl_env.data.kinds.mix import MIX_KINDS
from drrl_env.data.sources import DEFAULT_CORPUS
from drrl_env.replay import replay
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
    check_unique,
    registered_id,
    run_main,
)
from harness.statistics import mean_interval, paired_difference, window_labels

POLICIES = (
    "uniform",
    "global_p",
    "static_layer",
    "random_search",
    "greedy_search",
    "per_window_optimum",
)
REFERENCE = "static_layer"
GROWABLE = ("eval_windows", "budgets", "kinds", "policies")
"""Arguments a resumed run may change: an episode (budget, kind, policy, window) measures the
same whatever else is played (held-out window ``i`` is the same text for any count), and the
schedules are fitted on the train windows, which must match."""
KEY = ("budget", "kind", "policy", "window")
METRICS = ("mean_kl", "top1_agreement", "delta_ppl_pct", "retrieval_correct", "flops_ratio")
COLUMNS_MD = table_columns(
    "kind budget policy mean_kl kl_vs_static verdict top1_agreement delta_ppl_pct "
    "retrieval_correct retrieval_vs_exact retrieval_vs_static flops_ratio windows",
    delta_ppl_pct=("Δ ppl", "{}"),
)


@dataclass(frozen=True)
class Args(RunArgs):
    """Deployable allocations against the per-window optimum, per kind of text and budget."""

    env_id: str = "DRRL-Mix-TopP-v0"
    """A registered cached id whose method has input-dependent costs (``topp``)."""
    budgets: tuple[float, ...] = (0.5, 0.3)
    """FLOPs budgets, fractions of exact attention's (counted causally), each in (0, 1]."""
    kinds: tuple[str, ...] | None = None
    """Kinds of text to score: a mix's own kinds (its windows of that kind) and ``mix`` (all
    of them); by default every kind the held-out windows have (``prose code passkey mix``
    for a mix)."""
    eval_corpus: str | None = None
    """Held-out windows from this corpus instead of the id's (``passkey``: every eval window
    a passkey window, for retrieval rows over many windows); the schedules stay fitted on
    the id's train windows."""
    train_windows: int = 12
    """Train-split windows the schedules are fitted on (a mix: a multiple of 3)."""
    eval_windows: int = 24
    """Held-out windows every schedule is played on, live (a mix: a multiple of 3)."""
    evaluations: int = 500
    """Candidate evaluations random and greedy search each get (one evaluation: a candidate
    scored on every train window, from the cached lookups)."""
    rule_rank: int = 16
    """Rank of the selection estimate the global top-p rule uses."""
    policies: tuple[str, ...] = POLICIES
    """The policies played (``static_layer``, the reference of the paired differences,
    always among them)."""
    fit_per_kind: bool = False
    """Fit the deployable schedules on the train windows of each kind apart (they then
    know the kind of text they will read); by default they are fitted once on every train
    window, as a deployed allocation that does not know the input would be."""
    seed: int = 0
    """Seed of the random search."""
    run_name: str = "adaptivity"
    """Run folder inside out_dir."""

    def __post_init__(self) -> None:
        kwargs = registered_id(self.env_id, cached=True)
        check_minimum(
            self, ("train_windows", "eval_windows", "evaluations", "threads", "rule_rank")
        )
        check_budgets(self.budgets)
        check_unique("policies", self.policies)
        for policy in self.policies:
            if policy not in POLICIES:
                raise ArgumentError(f"policies: {policy!r} is not one of {POLICIES}")
        if REFERENCE not in self.policies:
            raise ArgumentError(f"policies must include {REFERENCE} (the paired reference)")
        if self.eval_corpus is not None and kind_of(self.eval_corpus) not in corpus_names():
            raise ArgumentError(
                f"eval_corpus: {self.eval_corpus!r} is not a corpus; known: "
                f"{', '.join(corpus_names())}"
            )
        if self.kinds is not None:
            check_unique("kinds", self.kinds)
            allowed = self.allowed_kinds(kwargs)
            for kind in self.kinds:
                if kind not in allowed:
                    raise ArgumentError(
                        f"kinds: {kind!r} is not one of {allowed} for {self.env_id}"
                        + (f" with eval_corpus {self.eval_corpus!r}" if self.eval_corpus else "")
                    )
        super().__post_init__()

    def allowed_kinds(self, kwargs: dict | None = None) -> tuple[str, ...]:
        """The kinds the held-out windows have: a mix's kinds and ``mix``, else the corpus."""
        if kwargs is None:
            kwargs = registered_id(self.env_id, cached=True)
        corpus = kind_of(self.eval_corpus or kwargs.get("corpus", DEFAULT_CORPUS))
        return (*MIX_KINDS, "mix") if corpus == "mix" else (corpus,)

    def scored_kinds(self) -> tuple[str, ...]:
        """The kinds of text the table has rows for (``kinds``, or every allowed one)."""
        return self.kinds if self.kinds is not None else self.allowed_kinds()

    def env_kwargs(self, split: str, windows: int) -> dict:
        """The envs' keywords: no budget wall, no guardrail (schedules are played as given)."""
        corpus = {"corpus": self.eval_corpus} if split == "eval" and self.eval_corpus else {}
        return {
            "split": split,
            "max_windows": windows,
            "budget": None,
            "max_perturbation": 1.0,
            "device": self.device,
            **corpus,
        }


def kind_of(corpus: str) -> str:
    """A corpus spelling's kind: its name before any ``:OPTION``."""
    return corpus.partition(":")[0]


def window_kinds(env: gym.Env, n_windows: int) -> np.ndarray:
    """Each window's kind: a mix alternates its kinds (window ``i``: ``MIX_KINDS[i % 3]``)."""
    corpus = kind_of(env.unwrapped.config.corpus)
    if corpus == "mix":
        return np.array([MIX_KINDS[i % len(MIX_KINDS)] for i in range(n_windows)])
    return np.array([corpus] * n_windows)


def rule_candidates(env: gym.Env, rank: int) -> np.ndarray:
    """Actions at ``rank`` ordered by increasing mass target (the global top-p rule)."""
    grid = env.unwrapped.actions
    chosen = np.flatnonzero(grid.ranks == rank)
    if chosen.size == 0:
        raise ArgumentError(
            f"rule_rank: {rank} is not a rank of the grid {sorted(set(grid.ranks))}"
        )
    return chosen[np.argsort(grid.keeps[chosen], kind="stable")]


def fitted_schedules(problem: Problem, candidates: np.ndarray, args: Args) -> dict:
    """The deployable schedules of one (kind, budget), by policy; a policy that cannot meet
    the budget is left out with a note."""
    fitters = {
        "uniform": lambda: best_uniform(problem),
        "global_p": lambda: global_mass_rule(problem, candidates),
        "static_layer": lambda: static_per_layer(problem),
        "random_search": lambda: random_search(problem, args.evaluations, args.seed),
        "greedy_search": lambda: greedy_search(problem, args.evaluations),
    }
    schedules, notes = {}, {}
    for name, fit in fitters.items():
        if name not in args.policies:
            continue
        try:
            schedules[name] = fit()
        except ValueError as error:
            notes[name] = str(error)
    return schedules, notes


def live_row(live: gym.Env, window: int, actions: np.ndarray) -> dict:
    """One live episode of a fixed schedule: quality against exact attention and FLOPs."""
    result = replay(live.unwrapped, window, actions)
    summary = result.summary
    if not np.array_equal(np.asarray(summary["actions"]), actions):
        raise RuntimeError("the live env changed the schedule (guardrail or budget wall)")
    return {
        "mean_kl": summary["mean_kl"],
        "top1_agreement": summary["top1_agreement"],
        "delta_ppl_pct": 100 * (summary["perplexity"] / summary["perplexity_full"] - 1),
        "retrieval_correct": summary.get("retrieval_correct", math.nan),
        "retrieval_correct_full": summary.get("retrieval_correct_full", math.nan),
        "flops_ratio": summary["flops_ratio"],
    }


def headroom(rows: pd.DataFrame, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Per (kind, budget, policy): each metric's mean with its interval over windows, and
    the paired KL difference against ``static_layer`` on the same windows.

    ``groups`` (indexed by window) labels the windows that share text
    (:meth:`~drrl_env.data.sources.Source.text_groups`): their intervals resample them
    together (:func:`harness.statistics.mean_interval`); None: every window apart.
    """

    table = []
    for (kind, budget), group in rows.groupby(["kind", "budget"], sort=False, observed=True):
        reference = group[group["policy"] == REFERENCE].set_index("window")
        for policy, part in group.groupby("policy", sort=False, observed=True):
            part = part.set_index("window").sort_index()
            row = {"kind": kind, "budget": budget, "policy": policy, "windows": len(part)}
            for metric in METRICS:
                values = part[metric].dropna()
                row[metric] = (
                    mean_interval(values, groups=window_labels(groups, values.index)).format(
                        scientific=metric == "mean_kl"
                    )
                    if len(values)
                    else math.nan
                )
                row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            shared = part.index.intersection(reference.index)
            if policy != REFERENCE and len(shared):
                diff = paired_difference(
                    part.loc[shared, "mean_kl"],
                    reference.loc[shared, "mean_kl"],
                    groups=window_labels(groups, shared),
                )
                row.update(diff.columns("kl_vs_static", scientific=True))
            row.update(retrieval_differences(part, reference, policy, groups))
            table.append(row)
    return pd.DataFrame(table)


def retrieval_differences(
    part: pd.DataFrame,
    reference: pd.DataFrame,
    policy: str,
    groups: np.ndarray | None = None,
) -> dict:
    """Paired differences of retrieval accuracy over the passkey windows (indexed by window):
    against exact attention on the same windows, and against ``static_layer``; ``groups``
    as for :func:`headroom`."""
    scored = part["retrieval_correct"].notna() & part["retrieval_correct_full"].notna()
    row = {}
    if scored.any():
        answered = part.loc[scored, "retrieval_correct"]
        exact = paired_difference(
            answered,
            part.loc[scored, "retrieval_correct_full"],
            groups=window_labels(groups, answered.index),
        )
        row["retrieval_vs_exact"] = exact.format()
        shared = answered.index.intersection(reference.index)
        if policy != REFERENCE and len(shared):
            static = paired_difference(
                answered.loc[shared],
                reference.loc[shared, "retrieval_correct"],
                groups=window_labels(groups, shared),
            )
            row["retrieval_vs_static"] = static.format()
    return row


def plot(table: pd.DataFrame, path: Path) -> Path:
    """Mean KL against live FLOPs, one panel per kind, one marker per policy and budget."""
    plt = pyplot()

    kinds = list(dict.fromkeys(table["kind"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        part = table[table["kind"] == kind]
        for policy in dict.fromkeys(part["policy"]):
            rows = part[part["policy"] == policy]
            ax.plot(rows["flops_ratio_mean"], rows["mean_kl_mean"], "o-", label=policy)
        ax.set(xlabel="executed FLOPs / exact (live)", ylabel="mean token KL", title=kind)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def recorded_schedules(rows: pd.DataFrame, fit_per_kind: bool) -> dict:
    """The deployable schedules a run's episodes played, ``{(budget, group, policy): (S, L)}``
    (``group``: the kind with ``fit_per_kind``, else ``"all kinds"``).

    A deployable schedule is fitted once per (budget, group) and played on every window, so
    each of its rows records the same ``actions``.

    Raises:
        ArgumentError: Two rows of one schedule hold different actions (a damaged log).
    """
    schedules: dict[tuple[float, str, str], np.ndarray] = {}
    for row in rows.itertuples():
        if row.policy == "per_window_optimum":
            continue
        group = row.kind if fit_per_kind and row.kind != "mix" else "all kinds"
        key = (float(row.budget), group, row.policy)
        actions = np.asarray(json.loads(row.actions), dtype=np.int64)
        if key in schedules and not np.array_equal(schedules[key], actions):
            raise ArgumentError(
                f"episodes.csv plays two schedules for {row.policy} at budget {row.budget:g} "
                f"({group}); a fitted schedule is the same on every window: the log is damaged"
            )
        schedules[key] = actions
    return schedules


class Fitter:
    """Fits the deployable schedules on the train windows; the train env (and its cache) is
    made only when a schedule is not recorded by the run yet."""

    def __init__(self, args: Args, candidates: np.ndarray) -> None:
        self.args, self.candidates = args, candidates
        self.train: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def fit(self, budget: float, kind: str) -> tuple[dict, dict]:
        """(schedules by policy, notes by policy) fitted on the train windows of ``kind``
        (every train window unless ``fit_per_kind``)."""
        args = self.args
        if self.train is None:
            train = gym.make(args.env_id, **args.env_kwargs("train", args.train_windows))
            values, costs = measurements(train)
            self.train = values, costs, window_kinds(train, len(values))
            train.close()
        values, costs, kinds = self.train
        per_kind = args.fit_per_kind and kind != "mix"
        fit = kinds == kind if per_kind else np.ones(len(kinds), bool)
        if not fit.any():
            raise ArgumentError(f"no {kind} windows among the first train windows")
        problem = Problem(values[fit], costs[fit], budget)
        return fitted_schedules(problem, self.candidates, args)


def play(
    args: Args,
    live: gym.Env,
    log: RowLog,
    todo: list[tuple],
    eval_kinds: np.ndarray,
    notes: dict,
) -> None:
    """Play the ``todo`` plans live, window by window, appending a row to ``log`` for each.

    The cached eval windows give each per-window optimum (``None`` schedules: the knapsack on
    that window's values; one that cannot meet the budget is left out with a note) and every
    plan's planned cost.
    """
    evaluation = gym.make(args.env_id, **args.env_kwargs("eval", args.eval_windows))
    values, costs = measurements(evaluation)
    evaluation.close()
    plans = []
    for budget, kind, policy, window, schedule in todo:
        if schedule is None:
            try:
                schedule = per_window_optimum(values[window], costs[window], budget)
            except ValueError as error:
                notes[f"{kind} {budget:g} per_window_optimum {window}"] = str(error)
                continue
        plans.append((budget, kind, policy, window, schedule))
    plans.sort(key=lambda plan: plan[3])  # window by window: its exact reference runs once
    played: dict[tuple[int, bytes], dict] = {}
    for budget, kind, policy, window, schedule in tqdm(plans, desc="live episodes", unit="ep"):
        key = (window, schedule.tobytes())
        if key not in played:  # the same schedule on the same window measures the same
            played[key] = live_row(live, window, schedule)
        index = np.take_along_axis(costs[window], schedule[..., None], -1)
        row = {
            "budget": budget,
            "kind": kind,
            "policy": policy,
            "window": window,
            "window_kind": eval_kinds[window],
            "planned_flops_ratio": float(index.sum()),
            **played[key],
            "actions": json.dumps(schedule.tolist()),
        }
        log.append(pd.DataFrame([row]))


def main(args: Args) -> Path:
    """Fit every schedule on train windows, play it live on eval windows, write the table.

    A resumed run plays the deployable schedules its episodes recorded (their ``actions``),
    so it needs the train windows' cache only for a schedule it has not played yet.
    """
    folder = args.run_folder((*RESULT_FREE, *GROWABLE))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    live = gym.make(args.env_id, **args.env_kwargs("eval", args.eval_windows), backend="live")
    folder.prepare(asdict(args), torch=torch.__version__)
    log = RowLog(folder.path / "episodes.csv", KEY)
    recorded = recorded_schedules(log.read(), args.fit_per_kind)
    earlier = json.loads(folder.config_path.read_text()).get("notes", {})
    n_eval = live.unwrapped.n_windows
    eval_kinds = window_kinds(live, n_eval)
    fitter = Fitter(args, rule_candidates(live, args.rule_rank))
    deployable = [policy for policy in args.policies if policy != "per_window_optimum"]
    kinds = args.scored_kinds()
    plans, notes, fit_groups, fitted_groups = [], {}, set(), set()
    for budget in args.budgets:
        for kind in kinds:
            group = kind if args.fit_per_kind and kind != "mix" else "all kinds"
            fit_groups.add((budget, group))
            scored = np.flatnonzero(
                np.ones(len(eval_kinds), bool) if kind == "mix" else eval_kinds == kind
            )
            if not scored.size:
                raise ArgumentError(f"no {kind} windows among the first eval windows")
            schedules = {
                policy: recorded[(budget, group, policy)]
                for policy in deployable
                if (budget, group, policy) in recorded
            }
            left_out = {  # recorded as not fittable by an earlier call (config notes)
                name: earlier[name]
                for policy in deployable
                if policy not in schedules and (name := f"{group} {budget:g} {policy}") in earlier
            }
            notes.update(left_out)
            settled = len(schedules) + len(left_out) == len(deployable)
            if not settled and (budget, group) not in fitted_groups:
                fitted_groups.add((budget, group))
                fitted, skipped = fitter.fit(budget, kind)
                notes.update({f"{group} {budget:g} {k}": v for k, v in skipped.items()})
                for policy, schedule in fitted.items():
                    recorded[(budget, group, policy)] = schedules.setdefault(policy, schedule)
                schedules = {p: schedules[p] for p in deployable if p in schedules}
            for window in scored:
                for policy, schedule in schedules.items():
                    plans.append((budget, kind, policy, int(window), schedule))
                if "per_window_optimum" in args.policies:  # its schedule: when it is played
                    plans.append((budget, kind, "per_window_optimum", int(window), None))
    reused = len(fit_groups - fitted_groups)
    print(
        f"deployable schedules: {reused} (budget, group) read from episodes.csv, "
        f"{len(fitted_groups)} fitted on the train windows",
        flush=True,
    )
    done = log.keys()
    wanted = [log.key_of(dict(zip(KEY, plan[:4], strict=True))) for plan in plans]
    todo = [plan for plan, key in zip(plans, wanted, strict=True) if key not in done]
    if todo:  # the eval windows' cache: per-window optima and planned costs
        play(args, live, log, todo, eval_kinds, notes)
    covered = set(wanted)  # the tables cover this call's plans (a resumed log may hold more)
    rows = log.read()
    rows = rows[[log.key_of(row) in covered for row in rows[list(KEY)].to_dict("records")]]
    order = {"kind": list(kinds), "budget": list(args.budgets), "policy": list(POLICIES)}
    for column, values in order.items():
        rows[column] = pd.Categorical(rows[column], categories=values, ordered=True)
    rows = rows.sort_values(["kind", "budget", "policy", "window"])
    table = headroom(rows, window_groups(live, n_eval))
    table.to_csv(folder.path / "headroom.csv", index=False)
    written = pd.read_csv(folder.path / "headroom.csv")
    (folder.path / "headroom.md").write_text(markdown_from_frame(written, COLUMNS_MD))
    plot(written, folder.path / "headroom.png")
    covers = {**{name: getattr(args, name) for name in GROWABLE}, "kinds": kinds}
    folder.update_config(
        wall_s=time.perf_counter() - started, episodes=len(rows), notes=notes, table_covers=covers
    )
    print((folder.path / "headroom.md").read_text())
    for where, note in notes.items():
        print(f"left out: {where}: {note}")
    return folder.path


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

"""Schedules of agents.allocations against brute force on small hand-made problems, and the
adaptivity script on the tiny mix id."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from script_runner import run_in_process

from agents.allocations import (
    Problem,
    best_uniform,
    global_mass_rule,
    greedy_search,
    layer_frontiers,
    per_window_optimum,
    random_search,
    static_per_layer,
)

ROOT = Path(__file__).resolve().parents[1]


def _problem(budget: float, seed: int = 0, windows: int = 3, shape=(2, 3, 4)) -> Problem:
    """Values rise with cost (with noise); costs on a grid of 1/400 so knapsacks are exact."""
    rng = np.random.default_rng(seed)
    segments, layers, actions = shape
    base = np.sort(rng.integers(1, 40, size=(windows, segments, layers, actions)), axis=-1)
    costs = base / 400.0
    values = np.log1p(base) + rng.normal(0, 0.05, size=base.shape)
    return Problem(values, costs, budget)


def _all_per_layer(problem: Problem):
    layers, actions = problem.shape[1], problem.values.shape[-1]
    for allocation in itertools.product(range(actions), repeat=layers):
        schedule = problem.per_layer(np.array(allocation))
        value, cost = problem.score(schedule)
        yield schedule, value, cost


def test_problem_checks_its_arrays() -> None:
    with pytest.raises(ValueError, match="both be"):
        Problem(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 5)), 0.5)
    with pytest.raises(ValueError, match="budget"):
        Problem(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)), 1.5)


def test_score_sums_cells_and_averages_windows() -> None:
    problem = _problem(0.5)
    schedule = np.array([[0, 1, 2], [3, 0, 1]])
    value, cost = problem.score(schedule)
    s, l_ = np.indices(schedule.shape)
    assert value == pytest.approx(problem.values[:, s, l_, schedule].sum(axis=(1, 2)).mean())
    assert cost == pytest.approx(problem.costs[:, s, l_, schedule].sum(axis=(1, 2)).mean())


@pytest.mark.parametrize("budget", [0.25, 0.4, 0.6])
def test_static_per_layer_is_the_best_feasible_per_layer_allocation(budget) -> None:
    problem = _problem(budget)
    schedule = static_per_layer(problem)
    value, cost = problem.score(schedule)
    best = max(v for _, v, c in _all_per_layer(problem) if problem.fits(c))
    assert problem.fits(cost) and value == pytest.approx(best)
    # search finds feasible allocations, never better than the exact knapsack
    for found in (random_search(problem, 50, 1), greedy_search(problem, 50)):
        found_value, found_cost = problem.score(found)
        assert problem.fits(found_cost) and found_value <= value + 1e-12
        assert (found == found[0]).all(), "per layer: the same action at every segment"


def test_uniform_and_global_rule() -> None:
    problem = _problem(0.4)
    schedule = best_uniform(problem)
    assert (schedule == schedule[0, 0]).all()
    feasible = [
        (problem.score(np.full(problem.shape, a))[0], a)
        for a in range(4)
        if problem.fits(problem.score(np.full(problem.shape, a))[1])
    ]
    assert schedule[0, 0] == max(feasible)[1]
    rule = global_mass_rule(problem, np.array([0, 1, 2, 3]))
    assert rule[0, 0] == max(a for _, a in feasible)  # the last feasible candidate
    with pytest.raises(ValueError, match="no single action"):
        best_uniform(_problem(0.001))
    with pytest.raises(ValueError, match="no mass target"):
        global_mass_rule(_problem(0.001), np.array([0, 1]))
    for fit in (static_per_layer, lambda p: random_search(p, 5), lambda p: greedy_search(p, 5)):
        with pytest.raises(ValueError, match="below the cheapest"):
            fit(_problem(0.001))


def test_searches_count_their_evaluations() -> None:
    problem = _problem(0.5)
    calls = []
    score = Problem.score

    class Counting(Problem):
        def score(self, schedule):
            calls.append(1)
            return score(self, schedule)

    counting = Counting(problem.values, problem.costs, problem.budget)
    for evaluations in (1, 3, 7, 40):
        calls.clear()
        greedy_search(counting, evaluations)
        assert len(calls) <= evaluations
        calls.clear()
        random_search(counting, evaluations)
        assert len(calls) == evaluations
    np.testing.assert_array_equal(random_search(problem, 20, 3), random_search(problem, 20, 3))
    with pytest.raises(ValueError, match="evaluations"):
        greedy_search(problem, 0)


def test_layer_frontiers_drop_dominated_actions() -> None:
    values = np.array([[1.0, 3.0, 2.0, 3.0]])
    costs = np.array([[1.0, 2.0, 3.0, 4.0]])
    (frontier,) = layer_frontiers(values, costs)
    assert frontier.tolist() == [0, 1]  # 2 costs more and is worth less; 3 is worth no more


def test_per_window_optimum_is_the_best_schedule_of_its_window() -> None:
    problem = _problem(0.3, windows=1, shape=(2, 2, 3))
    values, costs = problem.values[0], problem.costs[0]
    schedule = per_window_optimum(values, costs, 0.3)
    cells = np.indices(schedule.shape)
    best = -np.inf
    for choice in itertools.product(range(3), repeat=4):
        table = np.array(choice).reshape(2, 2)
        if costs[cells[0], cells[1], table].sum() <= 0.3 + 1e-12:
            best = max(best, values[cells[0], cells[1], table].sum())
    assert costs[cells[0], cells[1], schedule].sum() <= 0.3 + 1e-12
    assert values[cells[0], cells[1], schedule].sum() == pytest.approx(best)


# --- the script -----------------------------------------------------------------------------


def _run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    """The script, run in this process (see ``script_runner``)."""
    return run_in_process("experiments/adaptivity.py", args, {"DRRL_CACHE_DIR": str(cache)})


@pytest.fixture(scope="module")
def mix_cache(tmp_path_factory) -> Path:
    """One rollout cache for the script tests of this module (each run only adds windows)."""
    return tmp_path_factory.mktemp("mix-cache")


def _skip_without_wikitext() -> None:
    """The mix needs WikiText-2 on disk (its prose and passkey filler)."""
    from drrl_env.data import DataNotFoundError, resolve_source

    try:
        resolve_source("mix")
    except DataNotFoundError:
        pytest.skip("no local WikiText-2")


def test_adaptivity_script_writes_the_headroom_table(tmp_path, mix_cache) -> None:
    _skip_without_wikitext()
    args = [
        "--env-id", "DRRL-Tiny-Mix-TopP-v0", "--budgets", "0.6", "--train-windows", "3",
        "--eval-windows", "3", "--evaluations", "10", "--out-dir", str(tmp_path),
        "--threads", "1",
    ]  # fmt: skip
    result = _run(args, mix_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "adaptivity"
    rows = pd.read_csv(folder / "episodes.csv")
    kinds = {"prose": 1, "code": 1, "passkey": 1, "mix": 3}
    assert set(rows["policy"]) >= {"static_layer", "per_window_optimum", "uniform"}
    for kind, windows in kinds.items():
        part = rows[rows["kind"] == kind]
        assert part.groupby("policy")["window"].nunique().eq(windows).all(), kind
    passkey = rows[rows["window_kind"] == "passkey"]
    assert passkey["retrieval_correct"].isin([0.0, 1.0]).all()
    assert rows.loc[rows["window_kind"] != "passkey", "retrieval_correct"].isna().all()
    # fitted once on every train window: a kind's rows are the mix rows of its windows
    deployable = rows[rows["policy"] != "per_window_optimum"]
    mix = deployable[deployable["kind"] == "mix"].set_index(["policy", "window"])
    for row in deployable[deployable["kind"] != "mix"].itertuples():
        assert row.actions == mix.loc[(row.policy, row.window), "actions"]
        assert row.mean_kl == mix.loc[(row.policy, row.window), "mean_kl"]
    optimum = rows[rows["policy"] == "per_window_optimum"]
    assert (optimum["planned_flops_ratio"] <= 0.6 + 1e-9).all()
    assert (rows["mean_kl"] >= 0).all() and rows["top1_agreement"].between(0, 1).all()
    for actions in rows["actions"]:
        assert np.asarray(json.loads(actions)).shape == (4, 4)
    table = pd.read_csv(folder / "headroom.csv")
    assert len(table) == len(rows.groupby(["kind", "budget", "policy"]))
    static = table[table["policy"] == "static_layer"]
    assert static["verdict"].isna().all()
    others = table[table["policy"] != "static_layer"]
    assert others["verdict"].isin(["lower KL", "higher KL", "no difference"]).all()
    markdown = (folder / "headroom.md").read_text()
    assert markdown.startswith("| kind | budget | policy | mean token KL |")
    assert (folder / "headroom.png").read_bytes().startswith(b"\x89PNG")
    # resuming plays nothing again; a different argument is refused
    again = _run([*args, "--resume"], mix_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(pd.read_csv(folder / "episodes.csv")) == len(rows)
    changed = _run([*args, "--resume", "--evaluations", "11"], mix_cache)
    assert changed.returncode == 2 and "evaluations" in changed.stderr


def test_adaptivity_scores_held_out_windows_of_another_corpus(tmp_path, mix_cache) -> None:
    """``--eval-corpus passkey``: fitted on the mix's train windows, scored on passkey ones."""
    _skip_without_wikitext()
    args = [
        "--env-id", "DRRL-Tiny-Mix-TopP-v0", "--budgets", "0.6", "--train-windows", "3",
        "--eval-windows", "2", "--evaluations", "4", "--eval-corpus", "passkey",
        "--policies", "uniform", "static_layer", "per_window_optimum",
        "--out-dir", str(tmp_path), "--threads", "1",
    ]  # fmt: skip
    result = _run(args, mix_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "adaptivity" / "episodes.csv")
    assert set(rows["kind"]) == {"passkey"} and set(rows["window_kind"]) == {"passkey"}
    assert set(rows["policy"]) == {"uniform", "static_layer", "per_window_optimum"}
    assert sorted(set(rows["window"])) == [0, 1]
    assert rows["retrieval_correct"].isin([0.0, 1.0]).all()
    assert rows["retrieval_correct_full"].isin([0.0, 1.0]).all()
    config = json.loads((tmp_path / "adaptivity" / "config.json").read_text())
    assert config["args"]["eval_corpus"] == "passkey"
    # retrieval paired against exact attention and against static_layer, on the same windows
    from harness.statistics import paired_difference

    table = pd.read_csv(tmp_path / "adaptivity" / "headroom.csv").set_index("policy")
    static = rows[rows["policy"] == "static_layer"].set_index("window").sort_index()
    for policy, part in rows.groupby("policy"):
        part = part.set_index("window").sort_index()
        exact = paired_difference(part["retrieval_correct"], part["retrieval_correct_full"])
        assert table.loc[policy, "retrieval_vs_exact"] == exact.format()
        versus = table.loc[policy, "retrieval_vs_static"]
        if policy == "static_layer":
            assert pd.isna(versus)
        else:
            diff = paired_difference(part["retrieval_correct"], static["retrieval_correct"])
            assert versus == diff.format()
    markdown = (tmp_path / "adaptivity" / "headroom.md").read_text()
    assert "| retrieval | retrieval − exact | retrieval − static_layer |" in markdown


def test_a_resumed_adaptivity_run_grows_into_the_run_made_at_once(tmp_path, mix_cache) -> None:
    """``--resume`` with more eval windows and another budget plays only what is missing; the
    grown run's episodes and table equal those of one run with those arguments, and naming
    fewer windows again gives the smaller run's table back."""
    _skip_without_wikitext()
    common = [
        "--env-id", "DRRL-Tiny-Mix-TopP-v0", "--train-windows", "3", "--threads", "1",
        "--policies", "static_layer", "per_window_optimum",
    ]  # fmt: skip
    small = [*common, "--budgets", "0.6", "--eval-windows", "3"]
    grown = [*common, "--budgets", "0.6", "0.45", "--eval-windows", "6"]
    grow = ["--out-dir", str(tmp_path / "grow")]
    assert _run([*small, *grow], mix_cache).returncode == 0
    folder = tmp_path / "grow" / "adaptivity"
    first_rows = pd.read_csv(folder / "episodes.csv")
    first_table = (folder / "headroom.csv").read_text()
    result = _run([*grown, *grow, "--resume"], mix_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.read_csv(folder / "episodes.csv")
    pd.testing.assert_frame_equal(rows.iloc[: len(first_rows)], first_rows)  # kept, not replayed
    once = tmp_path / "once"
    assert _run([*grown, "--out-dir", str(once)], mix_cache).returncode == 0
    made_at_once = pd.read_csv(once / "adaptivity" / "episodes.csv")
    key = ["budget", "kind", "policy", "window"]
    pd.testing.assert_frame_equal(
        rows.sort_values(key).reset_index(drop=True),
        made_at_once.sort_values(key).reset_index(drop=True),
    )
    assert (folder / "headroom.csv").read_text() == (
        once / "adaptivity" / "headroom.csv"
    ).read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["args"]["eval_windows"] == 3 and config["resumed"] == 1
    assert config["table_covers"] == {
        "eval_windows": 6,
        "budgets": [0.6, 0.45],
        "kinds": ["prose", "code", "passkey", "mix"],
        "policies": ["static_layer", "per_window_optimum"],
    }
    # naming the first run's arguments again plays nothing and shows its table
    again = _run([*small, *grow, "--resume"], mix_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(pd.read_csv(folder / "episodes.csv")) == len(rows)
    assert (folder / "headroom.csv").read_text() == first_table


def test_a_resumed_adaptivity_run_plays_its_recorded_schedules(tmp_path, mix_cache) -> None:
    """A resume reads the deployable schedules from its episodes: with the train windows'
    cache gone it still grows into the run made at once; a new budget fits (and builds the
    train cache) again, and a log whose rows disagree on a schedule is refused."""
    _skip_without_wikitext()
    common = [
        "--env-id", "DRRL-Tiny-Mix-TopP-v0", "--train-windows", "3", "--threads", "1",
        "--policies", "static_layer", "per_window_optimum", "uniform",
    ]  # fmt: skip
    cache = tmp_path / "cache"
    shutil.copytree(mix_cache, cache)
    out = ["--out-dir", str(tmp_path / "run")]
    small = [*common, "--budgets", "0.6", "--eval-windows", "3"]
    assert _run([*small, *out], cache).returncode == 0
    for train in (cache / "rollouts").glob("*-train-*"):
        shutil.rmtree(train)  # the schedules can no longer be fitted from the cache
    grown = [*common, "--budgets", "0.6", "--eval-windows", "6"]
    result = _run([*grown, *out, "--resume"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list((cache / "rollouts").glob("*-train-*"))  # nothing fitted, nothing built
    assert "deployable schedules: 1 (budget, group) read from episodes.csv, 0 fitted" in (
        result.stdout
    )
    rows = pd.read_csv(tmp_path / "run" / "adaptivity" / "episodes.csv")
    assert _run([*grown, "--out-dir", str(tmp_path / "once")], mix_cache).returncode == 0
    once = pd.read_csv(tmp_path / "once" / "adaptivity" / "episodes.csv")
    key = ["budget", "kind", "policy", "window"]
    pd.testing.assert_frame_equal(
        rows.sort_values(key).reset_index(drop=True), once.sort_values(key).reset_index(drop=True)
    )
    # another budget has no recorded schedule: it is fitted on the (rebuilt) train windows
    more = [*common, "--budgets", "0.6", "0.45", "--eval-windows", "3"]
    result = _run([*more, *out, "--resume"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((cache / "rollouts").glob("*-train-*"))
    assert "1 (budget, group) read from episodes.csv, 1 fitted on the train windows" in (
        result.stdout
    )
    grown_rows = pd.read_csv(tmp_path / "run" / "adaptivity" / "episodes.csv")
    assert set(grown_rows["budget"]) == {0.6, 0.45}
    # a damaged log: one window's static schedule differs from the others'
    log = tmp_path / "run" / "adaptivity" / "episodes.csv"
    damaged = grown_rows.copy()
    first = damaged.index[damaged["policy"].eq("static_layer")][0]
    actions = np.asarray(json.loads(damaged.loc[first, "actions"]))
    actions[0, 0] = (actions[0, 0] + 1) % 3
    damaged.loc[first, "actions"] = json.dumps(actions.tolist())
    damaged.to_csv(log, index=False)
    result = _run([*more, *out, "--resume"], cache)
    assert result.returncode == 2
    assert "episodes.csv plays two schedules for static_layer at budget" in result.stderr


def test_adaptivity_tables_resample_shared_text_together_and_need_no_cache(
    tmp_path, mix_cache
) -> None:
    """Mix windows 3 i (prose) and 3 i + 2 (passkey over that prose) are one text group in
    every interval of the mix rows; with every episode played, a resume rebuilds the same
    tables from episodes.csv with no rollout cache at all."""
    _skip_without_wikitext()
    from drrl_env.data import resolve_source
    from harness.statistics import mean_interval, paired_difference

    args = [
        "--env-id", "DRRL-Tiny-Mix-TopP-v0", "--train-windows", "3", "--threads", "1",
        "--policies", "static_layer", "per_window_optimum", "--budgets", "0.6",
        "--eval-windows", "6", "--out-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    cache = tmp_path / "cache"
    shutil.copytree(mix_cache, cache)
    assert _run(args, cache).returncode == 0
    folder = tmp_path / "run" / "adaptivity"
    rows = pd.read_csv(folder / "episodes.csv")
    table = pd.read_csv(folder / "headroom.csv").set_index(["kind", "policy"])
    groups = resolve_source("mix").text_groups(6)
    assert groups.tolist() == [0, 6, 0, 1, 7, 1]
    mix = rows[rows["kind"] == "mix"]
    static = mix[mix["policy"] == "static_layer"].set_index("window").sort_index()
    optimum = mix[mix["policy"] == "per_window_optimum"].set_index("window").sort_index()
    diff = paired_difference(optimum["mean_kl"], static["mean_kl"], groups=groups[static.index])
    assert table.loc[("mix", "per_window_optimum"), "kl_vs_static"] == diff.format(scientific=True)
    kl = mean_interval(static["mean_kl"], groups=groups[static.index])
    assert table.loc[("mix", "static_layer"), "mean_kl"] == kl.format(scientific=True)
    naive = paired_difference(optimum["mean_kl"], static["mean_kl"])
    assert diff.high - diff.low != naive.high - naive.low  # the groups changed the interval
    # per kind, every window has its own text: the plain intervals
    prose = rows[(rows["kind"] == "prose") & (rows["policy"] == "static_layer")]
    assert table.loc[("prose", "static_layer"), "mean_kl"] == mean_interval(
        prose["mean_kl"]
    ).format(scientific=True)
    before = (folder / "headroom.csv").read_text()
    shutil.rmtree(cache / "rollouts")
    result = _run([*args, "--resume"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (cache / "rollouts").exists()  # no window built: nothing was left to play
    assert (folder / "headroom.csv").read_text() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--env-id", "DRRL-Tiny-Mix-TopP-Live-v0"], "is not a cached id"),
        (["--budgets", "1.5"], "budgets must be in"),
        (["--kinds", "poetry"], "kinds: 'poetry'"),
        (["--train-windows", "0"], "train_windows must be >= 1"),
        (["--eval-corpus", "poetry"], "eval_corpus: 'poetry' is not a corpus"),
        (["--eval-corpus", "passkey", "--kinds", "prose"], "kinds: 'prose' is not one of"),
        (["--policies", "uniform", "oracle"], "policies: 'oracle' is not one of"),
        (["--policies", "uniform"], "policies must include static_layer"),
    ],
)
def test_adaptivity_script_refuses_bad_arguments(tmp_path, extra, message) -> None:
    result = _run(
        ["--env-id", "DRRL-Tiny-Mix-TopP-v0", *extra, "--out-dir", str(tmp_path)], tmp_path
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "adaptivity").exists()

"""experiments/budget_frontier.py on the tiny budgeted env: every budget and policy, in budget."""

from __future__ import annotations

import pandas as pd
import pytest
from script_runner import run_in_process

SCRIPT = "experiments/budget_frontier.py"
TINY = [
    "--env-id", "DRRL-Tiny-Budget-v0",
    "--budgets", "0.9", "0.6",
    "--agents", "ppo:mlp",
    "--seeds", "0",
    "--total-timesteps", "256",
    "--train-windows", "2",
    "--eval-windows", "2",
    "--threads", "1",
]  # fmt: skip
BASELINES = {
    "full_rank",
    "best_uniform",
    "static_allocation",
    "lagrangian_greedy",
    "dp_optimum",
    "uniform_random",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    env = {"DRRL_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "fr-cache")}
    done = run_in_process(SCRIPT, [*TINY, "--out-dir", str(out), "--run-name", "f"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "f"


def test_every_budget_and_policy_is_in_the_frontier_and_within_budget(run_dir):
    frontier = pd.read_csv(run_dir / "frontier.csv")
    assert sorted(set(frontier["budget"])) == [0.6, 0.9]
    for budget, part in frontier.groupby("budget"):
        assert set(part["policy"]) == {"ppo_mlp", *BASELINES}
        assert (part["flops_ratio"] <= budget + 1e-9).all()
        full = part[part["policy"] == "full_rank"].iloc[0]
        assert full["flops_ratio"] > budget - 0.1  # asks for exact attention: spends the budget
        assert (run_dir / f"budget_{budget:g}" / "summary.csv").is_file()
    # token KL, top-1 and the KL paired against the static allocation, with intervals
    from harness.statistics import Interval

    for row in frontier.itertuples():
        low, high = row.mean_kl_low, row.mean_kl_high
        kl = Interval(row.mean_kl, low, high, 2).format(scientific=True)
        assert row.mean_kl_interval == kl and row.mean_kl >= 0 and low <= row.mean_kl <= high
        top1 = Interval(row.top1_agreement, row.top1_agreement_low, row.top1_agreement_high, 2)
        assert row.top1_interval == top1.format() and 0 <= row.top1_agreement <= 1
        if row.policy == "static_allocation":
            assert pd.isna(row.kl_vs_reference_interval) and pd.isna(row.verdict)  # "n/a"
        else:
            assert row.verdict in {"lower KL", "higher KL", "no difference"}
    table = (run_dir / "frontier.md").read_text()
    assert table.startswith("| budget | policy | token KL | KL − static_allocation | verdict |")
    assert table.count("\n") == len(frontier) + 2  # header, rule, one line per row
    assert (run_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_budget_outside_the_unit_interval_fails_before_any_work(tmp_path):
    result = run_in_process(SCRIPT, ["--budgets", "1.5", "--out-dir", str(tmp_path)])
    assert result.returncode == 2 and "budgets: 1.5 is outside (0, 1]" in result.stderr
    assert not list(tmp_path.iterdir())


def test_resume_may_name_other_budgets_and_keeps_the_finished_ones(run_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "f"
    # as committed: no models/ (nor tensorboard/), which a resume does not need
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("models", "tensorboard"))
    summary = (folder / "budget_0.9" / "summary.csv").read_text()
    env = {"DRRL_CACHE_DIR": str(run_dir.parent.parent / "fr-cache")}
    base = [*TINY, "--out-dir", str(tmp_path), "--run-name", "f"]

    def resume(*budgets: str) -> None:
        done = run_in_process(SCRIPT, [*base, "--resume", "--budgets", *budgets], env)
        assert done.returncode == 0, done.stderr[-3000:]

    resume("0.6")  # a finished budget only: nothing trained, the frontier shows it alone
    assert sorted(set(pd.read_csv(folder / "frontier.csv")["budget"])) == [0.6]
    assert not (folder / "budget_0.6" / "models").exists()
    resume("0.9", "0.6", "0.45")  # one more budget: run; the finished two kept as they were
    frontier = pd.read_csv(folder / "frontier.csv")
    assert sorted(set(frontier["budget"])) == [0.45, 0.6, 0.9]
    assert set(frontier.loc[frontier["budget"] == 0.45, "policy"]) == {"ppo_mlp", *BASELINES}
    assert (folder / "budget_0.9" / "summary.csv").read_text() == summary
    models = {budget: folder / f"budget_{budget:g}" / "models" for budget in (0.9, 0.6, 0.45)}
    assert [budget for budget, path in models.items() if path.exists()] == [0.45]  # trained
    config = json.loads((folder / "config.json").read_text())
    assert config["args"]["budgets"] == [0.9, 0.6], "the recorded arguments stay the run's"
    assert config["budgets_shown"] == [0.9, 0.6, 0.45] and config["resumed"] == 2
    changed = [*base, "--resume", "--seeds", "1"]  # other arguments are still refused
    result = run_in_process(SCRIPT, changed, env)
    assert result.returncode == 2 and "seeds (run: [0], now: [1])" in result.stderr

"""Learning curves: rows at start, every ``every`` steps and end; values replayable; plots."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.baselines import FullRankPolicy, GreedyOraclePolicy
from agents.compare import Args, Trial, learning_curve, run_trial, write_tables, write_trial
from agents.curves import LearningCurveCallback, baseline_returns, plot_curves, read_curves
from agents.evaluation import actor
from agents.factory import make_agent
from drrl_env.episodes import play_episode
from harness.runs import RowLog

WINDOWS = [0, 1]
TOTAL = 128
PNG = b"\x89PNG\r\n\x1a\n"


def smallest_action(observation, env) -> int:
    return 0


def eval_env_of(cache_root: str) -> gym.Env:
    return gym.make("DRRL-Tiny-v0", cache_dir=cache_root, split="eval", max_windows=2)


def mean_return(env: gym.Env, choose, windows=WINDOWS) -> float:
    return float(np.mean([math.fsum(play_episode(env, choose, w).rewards) for w in windows]))


def ppo(env: gym.Env, **kwargs):
    return make_agent("ppo", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, **kwargs)


@pytest.fixture(scope="module")
def eval_env(cache_root):
    return eval_env_of(cache_root)


@pytest.fixture(scope="module")
def trained(env, eval_env, tmp_path_factory):
    """PPO trained 128 steps (rollouts of 32), a curve point every 40 steps, three baselines."""
    board = tmp_path_factory.mktemp("curve-board")
    baselines = {
        "full_rank": FullRankPolicy(eval_env),
        "greedy_oracle": GreedyOraclePolicy(eval_env),
        "smallest": smallest_action,
    }
    curve = LearningCurveCallback(eval_env, WINDOWS, every=40, baselines=baselines)
    model = ppo(env, tensorboard_log=board)
    model.learn(TOTAL, callback=curve, tb_log_name="ppo")
    return model, curve, board


def test_rows_at_start_at_the_rollout_after_each_multiple_of_every_and_at_end(trained):
    _, curve, board = trained
    # rollouts start at 0, 32, 64, 96: 64 is the first past 40, 96 the first past 80
    assert [row["timesteps"] for row in curve.history] == [0, 64, 96, TOTAL]
    columns = ["timesteps", "eval_return_mean", "eval_return_std", "mean_fidelity"]
    columns += ["flops_ratio", "baseline_full_rank", "baseline_greedy_oracle", "baseline_smallest"]
    assert all(list(row) == columns for row in curve.history)

    (run,) = [path.parent for path in Path(board).rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(run))
    events.Reload()
    returns = events.Scalars("curve/eval_return")
    assert [e.step for e in returns] == [0, 64, 96, TOTAL]
    expected = [row["eval_return_mean"] for row in curve.history]
    assert [e.value for e in returns] == pytest.approx(expected, rel=1e-6)  # float32 in TB
    for tag in ("flops_ratio", "mean_fidelity", "baseline_greedy_oracle", "baseline_smallest"):
        assert len(events.Scalars(f"curve/{tag}")) == 4, tag


def test_row_returns_equal_independent_episodes_of_the_same_model(trained, env, cache_root):
    model, curve, _ = trained
    fresh = eval_env_of(cache_root)
    traces = [play_episode(fresh, actor(model), w) for w in WINDOWS]
    returns = [math.fsum(trace.rewards) for trace in traces]
    last = curve.history[-1]
    assert last["eval_return_mean"] == pytest.approx(np.mean(returns), rel=1e-12)
    assert last["eval_return_std"] == pytest.approx(np.std(returns), rel=1e-9, abs=1e-12)
    fidelity = np.mean([t.summary["mean_fidelity"] for t in traces])
    assert last["mean_fidelity"] == pytest.approx(fidelity, rel=1e-12)
    flops = np.mean([t.summary["flops_ratio"] for t in traces])
    assert last["flops_ratio"] == pytest.approx(flops, rel=1e-12)
    # the same seed rebuilds the model of a row: untrained (start), after two rollouts (64)
    untrained = ppo(env)
    first = curve.history[0]["eval_return_mean"]
    assert first == pytest.approx(mean_return(fresh, actor(untrained)), rel=1e-12)
    after_two = ppo(env).learn(64)
    assert curve.history[1]["timesteps"] == 64
    middle = curve.history[1]["eval_return_mean"]
    assert middle == pytest.approx(mean_return(fresh, actor(after_two)), rel=1e-12)
    assert first != pytest.approx(last["eval_return_mean"])  # training changed the policy


def test_baseline_values_equal_playing_the_baselines(trained, cache_root):
    _, curve, _ = trained
    fresh = eval_env_of(cache_root)
    direct = {
        "full_rank": mean_return(fresh, actor(FullRankPolicy(fresh))),
        "greedy_oracle": mean_return(fresh, actor(GreedyOraclePolicy(fresh))),
        "smallest": mean_return(fresh, smallest_action),
    }
    assert curve.baselines == pytest.approx(direct, rel=1e-12)
    assert direct["greedy_oracle"] != pytest.approx(direct["smallest"])  # distinct numbers
    for row in curve.history:
        assert {name: row[f"baseline_{name}"] for name in direct} == curve.baselines
    policies = {"smallest": smallest_action}
    assert baseline_returns(fresh, [1], policies) == {
        "smallest": mean_return(fresh, policies["smallest"], [1])
    }


@pytest.mark.parametrize(
    ("windows", "every", "message"),
    [
        (WINDOWS, 0, "every must be an int >= 1"),
        (WINDOWS, -5, "every must be an int >= 1"),
        (WINDOWS, 2.5, "every must be an int >= 1"),
        ([], 10, "windows must name at least one window"),
        ([0, 2], 10, "windows: 2 is outside the env's windows 0..1"),
    ],
)
def test_bad_arguments_name_the_argument(eval_env, windows, every, message):
    with pytest.raises(ValueError, match=message):
        LearningCurveCallback(eval_env, windows, every)


def test_live_env_is_refused(cache_root):
    live = gym.make("DRRL-Tiny-Live-v0", cache_dir=cache_root, max_windows=2)
    with pytest.raises(ValueError, match="needs the cached backend"):
        LearningCurveCallback(live, WINDOWS, every=10)


def test_plot_curves_draws_agents_seeds_and_baselines(tmp_path):
    rows = []
    for method, policy, seed, slope in [
        ("gram", "ppo_mlp", 0, 1.0),
        ("gram", "ppo_mlp", 1, 1.5),
        ("gram", "dqn_mlp", 0, 0.5),
        ("topk", "ppo_mlp", 0, 2.0),
    ]:
        for step in (0, 50, 100):
            row = {"method": method, "policy": policy, "seed": seed, "timesteps": step}
            row |= {"eval_return_mean": slope * step / 100, "eval_return_std": 0.1}
            row |= {"baseline_full_rank": 0.5} if method == "gram" else {"baseline_dp": 2.0}
            rows.append(row)
    path = plot_curves(pd.DataFrame(rows), tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="eval_return_mean"):
        plot_curves(pd.DataFrame({"timesteps": [0]}), tmp_path / "bad.png")


def tiny_args(**changes) -> Args:
    fields = {"env_id": "DRRL-Tiny-v0", "methods": ("calibrated",), "agents": ("ppo:mlp",)}
    fields |= {"total_timesteps": 64, "train_windows": 2, "eval_windows": 2, "device": "cpu"}
    return Args(**{**fields, "threads": 1, **changes})


def test_compare_trial_writes_its_curve_and_the_run_plots_it(cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", cache_root)
    trial = Trial("calibrated", "ppo:mlp", 0)
    result = run_trial(trial, tiny_args())
    # one rollout (PPO's default 128 steps) covers the 64 steps: start and end
    assert [row["timesteps"] for row in result["curve"]] == [0, 128]
    first = result["curve"][0]
    assert (first["method"], first["policy"], first["seed"]) == ("calibrated", "ppo_mlp", 0)
    assert {"baseline_full_rank", "baseline_greedy_oracle"} <= set(first)

    log = RowLog(tmp_path / "per_window.csv", ("method", "kind", "policy", "seed"))
    write_trial(tmp_path, log, trial, result)
    written = read_curves(tmp_path / "curves")
    pd.testing.assert_frame_equal(written, pd.DataFrame(result["curve"]))
    assert (tmp_path / "curves" / f"{trial.run_id}.csv").is_file()
    write_tables(tmp_path, pd.read_csv(tmp_path / "per_window.csv"))
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == PNG


def test_budgeted_trial_curve_has_the_budget_baselines(cache_root, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", cache_root)
    args = tiny_args(env_id="DRRL-Tiny-Budget-v0", methods=("topk",), total_timesteps=1000)
    args = replace(args, train_windows=1, eval_windows=1)
    curve = learning_curve(args, "topk")
    assert list(curve.baselines) == ["static_allocation", "lagrangian_greedy", "dp_optimum"]
    assert curve.every == 100 and curve.windows == [0]
    assert all(np.isfinite(value) for value in curve.baselines.values())

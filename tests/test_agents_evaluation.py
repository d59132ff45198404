"""Leaderboard evaluation: one CSV row per window, and every row replays exactly."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest

import drrl_env
from agents import (
    COLUMNS,
    EnergyThresholdPolicy,
    FullRankPolicy,
    GreedyOraclePolicy,
    StaticRankPolicy,
    evaluate_policy_on_windows,
    leaderboard,
    make_agent,
    read_csv,
    replay_csv,
    summarize,
)
from agents.evaluation import LIVE_COLUMNS
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.replay import ReplayMismatch

TINY = {**drrl_env.ENV_IDS["DRRL-Tiny-v0"], "max_windows": 2}
WINDOWS = [1, 0]
POLICIES = ["full_rank", "static_8", "energy_0.9", "greedy_oracle", "mppo", "dqn"]
LABELS = {"policy": POLICIES}
"""What replay checks the ``policy`` column against (the CSV belongs to no run)."""
NUMBERS = ["return", "mean_fidelity", "flops_ratio", "flops_reduction", "mean_perturbation"]


@pytest.fixture(scope="module")
def board(env, tmp_path_factory):
    trained = make_agent("maskable_ppo", env, "transformer", seed=0, n_steps=64, batch_size=32)
    trained.learn(128)
    policies = {
        "full_rank": FullRankPolicy(env),
        "static_8": StaticRankPolicy(env, 8),
        "energy_0.9": EnergyThresholdPolicy(env, 0.9),
        "greedy_oracle": GreedyOraclePolicy(env),
        "mppo": trained,
        "dqn": make_agent("dqn", env, "mlp", seed=0),
    }
    path = tmp_path_factory.mktemp("board") / "leaderboard.csv"
    return leaderboard(policies, env, WINDOWS, path), path


def test_one_row_per_policy_and_window(board):
    frame, path = board
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 6 * len(WINDOWS)
    assert frame["window"].tolist() == WINDOWS * 6
    assert frame["policy"].unique().tolist() == [
        "full_rank",
        "static_8",
        "energy_0.9",
        "greedy_oracle",
        "mppo",
        "dqn",
    ]
    full = frame[frame.policy == "full_rank"]
    # Exact attention pays only the observation's features: rotating each new key once.
    assert ((-0.1 < full.flops_reduction) & (full.flops_reduction < 0)).all()
    assert (full.mean_fidelity == 1.0).all()
    assert all(np.all(np.array(json.loads(r)) == 64) for r in full.ranks)
    for record in frame.to_dict("records"):
        rewards = json.loads(record["rewards"])
        assert len(rewards) == 16 and record["return"] == pytest.approx(sum(rewards))
        assert np.array(json.loads(record["ranks"])).shape == (4, 4)
        assert record["flops_reduction"] == pytest.approx(1 - record["flops_ratio"])
    static = frame[frame.policy == "static_8"]
    assert (static.masked_actions > 0).all(), "rank 8 from full rank trips the guardrail"
    assert (frame[frame.policy == "mppo"].masked_actions == 0).all()
    oracle, full_return = frame[frame.policy == "greedy_oracle"], full["return"].to_numpy()
    assert (oracle["return"].to_numpy() > full_return).all()
    for column in LIVE_COLUMNS:
        assert frame[column].isna().all(), column
    header, first = path.read_text().splitlines()[:2]
    assert header.split(",")[:4] == ["policy", "window", "backend", "return"]
    assert ']",,,,,,"{' in first, "cached rows leave the five live fields empty"
    table = summarize(frame)
    assert len(table) == 6 and table["return"].is_monotonic_decreasing
    assert table.loc["greedy_oracle", "masked_actions"] == 0


def test_the_csv_replays_exactly(board, env):
    frame, path = board
    replayed = replay_csv(path, env, labels=LABELS)
    written = read_csv(path)
    for column in [*NUMBERS, "mean_rank", "masked_actions"]:
        np.testing.assert_array_equal(replayed[column], written[column], err_msg=column)
        np.testing.assert_array_equal(replayed[column], frame[column], err_msg=column)


@pytest.mark.parametrize(
    ("column", "edit", "match"),
    [
        (
            "rewards",
            lambda v: json.dumps([*json.loads(v)[:-1], json.loads(v)[-1] + 1e-6]),
            "reward",
        ),
        ("mean_fidelity", lambda v: v - 1e-9, "mean_fidelity replays as"),
        ("masked_actions", lambda v: v + 1, "masked_actions replays as"),
        ("return", lambda v: v + 1e-6, "return replays as"),
    ],
)
def test_an_edited_number_does_not_replay(board, env, tmp_path, column, edit, match):
    frame = read_csv(board[1])
    frame.loc[3, column] = edit(frame.loc[3, column])
    frame.to_csv(tmp_path / "edited.csv", index=False)
    with pytest.raises(ReplayMismatch, match=match):
        replay_csv(tmp_path / "edited.csv", env, labels=LABELS)


def test_replay_needs_the_same_env(board, cache_root):
    other = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2, beta=0.3)
    with pytest.raises(ValueError, match=r"differs from the row's in \['beta'\]"):
        replay_csv(board[1], other, labels=LABELS)


def test_live_rows_record_and_replay_perplexity(cache_root, tmp_path):
    live = DynamicRankEnv(**TINY, split="eval", backend="live", cache_dir=cache_root)
    path = tmp_path / "live.csv"
    frame = evaluate_policy_on_windows(EnergyThresholdPolicy(live, 0.9), live, [1], path)
    (record,) = frame.to_dict("records")
    assert record["backend"] == "live" and record["policy"] == "energy_threshold_0.9"
    assert math.isfinite(record["perplexity"]) and math.isfinite(record["perplexity_full"])
    assert record["perplexity"] != record["perplexity_full"]
    labels = {"policy": "energy_threshold_0.9"}
    replayed = replay_csv(path, live, labels=labels)
    for column in [*NUMBERS, "perplexity", "perplexity_full"]:
        assert replayed.loc[0, column] == record[column], column
    edited = read_csv(path)
    edited.loc[0, "perplexity"] *= 1.001
    edited.to_csv(tmp_path / "edited.csv", index=False)
    with pytest.raises(ReplayMismatch, match="perplexity"):
        replay_csv(tmp_path / "edited.csv", live, labels=labels)


def test_bad_evaluation_input(env, cache_root):
    other = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2)
    with pytest.raises(ValueError, match="greedy oracle was built for another env"):
        evaluate_policy_on_windows(GreedyOraclePolicy(other), env, [0])
    with pytest.raises(ValueError, match="window"):
        evaluate_policy_on_windows(FullRankPolicy(env), env, [5])
    live = DynamicRankEnv(**TINY, ranks=(16, 32, 48, 64), backend="live", cache_dir=cache_root)
    with pytest.raises(ValueError, match="incompatible observation sizes"):
        evaluate_policy_on_windows(make_agent("ppo", env), live, [0])
    with pytest.raises(ValueError, match="built for observations of size 35"):
        evaluate_policy_on_windows(FullRankPolicy(env), live, [0])

"""Smoke run of experiments/compare_agents.py on the tiny model: every output exists and parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from agents import read_csv, replay_csv
from agents.reporting import markdown_table
from drrl_env.replay import live_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.getbasetemp() / "compare-cache"
    command = [
        sys.executable,
        str(ROOT / "experiments" / "compare_agents.py"),
        "--env-id",
        "DRRL-Tiny-v0",
        "--methods",
        "calibrated",
        "--agents",
        "ppo:mlp",
        "maskable_ppo:transformer",
        "--total-timesteps",
        "256",
        "--train-windows",
        "2",
        "--eval-windows",
        "2",
        "--energy-taus",
        "0.9",
        "--static-ranks",
        "8",
        "32",
        "--out-dir",
        str(out),
        "--run-name",
        "smoke",
        "--threads",
        "1",
        "--beta",
        "0.25",
        "--gamma",
        "0.05",
    ]
    env = {**os.environ, "DRRL_CACHE_DIR": str(cache)}
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    return out / "smoke"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, run_dir):
    return str(tmp_path_factory.getbasetemp() / "compare-cache")


def test_outputs_exist_and_parse(run_dir):
    for name in ("per_window.csv", "summary.csv", "table.md", "pareto.png", "config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["methods"] == ["calibrated"]
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(list((run_dir / "models").glob("*.zip"))) == 2


def test_summary_rows_and_markdown_generated_from_csv(run_dir):
    summary = pd.read_csv(run_dir / "summary.csv")
    policies = set(summary["policy"])
    expected = {
        "ppo_mlp",
        "maskable_ppo_transformer",
        "full_rank",
        "energy_0.9",
        "uniform_random",
        "greedy_oracle",
        "static_8",
        "static_32",
    }
    assert policies == expected
    full = summary[summary["policy"] == "full_rank"].iloc[0]
    assert full["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9)
    assert full["flops_reduction_pct"] == pytest.approx(0.0, abs=1e-9)
    assert (run_dir / "table.md").read_text().strip() == markdown_table(summary).strip()


def test_leaderboard_csv_replays(run_dir, cache_dir):
    path = run_dir / "leaderboard" / "calibrated" / "static_32.csv"
    frame = read_csv(path)
    assert frame["perplexity"].notna().all()
    config = json.loads(frame["env_config"].iloc[0])
    assert (config["beta"], config["gamma"]) == (0.25, 0.05)  # the run's weights, not defaults
    env = live_env(**config, cache_dir=cache_dir)
    assert len(replay_csv(path, env)) == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--agents", "ppo:mlp", "sac:mlp"], "agents: 'sac:mlp'"),
        (["--agents", "ppo:cnn"], "agents: 'ppo:cnn'"),
        (["--methods", "gram", "pca"], "methods: 'pca'"),
        (["--total-timesteps", "0"], "total_timesteps must be >= 1"),
        (["--beta", "-1"], "beta must be a non-negative number"),
    ],
)
def test_bad_arguments_fail_before_any_work(flags, message, tmp_path):
    command = [sys.executable, str(ROOT / "experiments" / "compare_agents.py"), *flags]
    command += ["--out-dir", str(tmp_path)]
    env = {**os.environ, "DRRL_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written or cached before the check"

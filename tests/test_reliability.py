"""Reliability: replay checks every recorded column, errors name what is wrong, nothing hangs.

One tiny compare_agents run (module fixture, about ten seconds) gives the per-window CSV
whose every column an edit must be caught in; the vectorized live env runs in a subprocess
with a hard timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import pandas as pd
import pytest

import drrl_env  # noqa: F401 (registers the ids)
from agents.evaluation import read_csv, replay_csv
from drrl_env.envs.config import EnvConfig
from drrl_env.replay import ReplayMismatch, live_env
from harness.runs import ArgumentError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("reliability-cache"))


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory) -> Path:
    """A tiny compare_agents run: one agent, one seed, the baselines, one eval window."""
    from agents.compare import Args, main

    args = Args(
        env_id="DRRL-Tiny-v0",
        methods=("calibrated",),
        agents=("ppo:mlp",),
        total_timesteps=64,
        train_windows=1,
        eval_windows=1,
        static_ranks=(8,),
        energy_taus=(0.9,),
        threads=1,
        device="cpu",
        out_dir=str(tmp_path_factory.mktemp("reliability-runs")),
        run_name="tiny",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRRL_CACHE_DIR", cache)
        return main(args)


@pytest.fixture(scope="module")
def live(run_dir, cache):
    """The live eval env the run's rows were produced on."""
    config = json.loads(read_csv(run_dir / "per_window.csv")["env_config"].iloc[0])
    env = live_env(**config, cache_dir=cache)
    yield env
    env.close()


def raw_rows(path: Path) -> pd.DataFrame:
    """A CSV's fields as the text written (what an edit changes)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def first_cell(text: str) -> int:
    return json.loads(text)[0][0]


def with_first_cell(text: str, value: int) -> str:
    table = json.loads(text)
    table[0][0] = value
    return json.dumps(table)


# -- 1. replay checks every recorded column ---------------------------------------------------


def test_the_runs_csvs_replay_with_every_column_checked(run_dir, live):
    per_window = raw_rows(run_dir / "per_window.csv")
    assert {"seed", "kind", "method", "attention_flops_full"} <= set(per_window.columns)
    assert len(replay_csv(run_dir / "per_window.csv", live)) == len(per_window)
    for path in sorted((run_dir / "leaderboard" / "calibrated").glob("*.csv")):
        assert len(replay_csv(path, live)) == 1, path.name


@pytest.mark.parametrize(
    ("row", "column", "edit", "match"),
    [
        (0, "attention_flops_full", lambda v: "684105840.0", "attention_flops_full replays as"),
        (0, "ranks", lambda v: with_first_cell(v, first_cell(v) + 8), r"ranks\[0\]\[0\] replays"),
        (
            0,
            "requested_ranks",
            lambda v: with_first_cell(v, first_cell(v) + 8),
            r"requested_ranks\[0\]\[0\] replays",
        ),
        (0, "requested_actions", lambda v: with_first_cell(v, 7), "requested"),
        (0, "method", lambda v: "gram", "method is 'gram'"),
        (0, "seed", lambda v: "1", "seed 1 is not a trial or baseline"),
        (0, "kind", lambda v: "baseline", "kind 'baseline'.* is not a trial or baseline"),
        (0, "policy", lambda v: "dqn_mlp", "policy 'dqn_mlp'.* is not a trial or baseline"),
        (1, "policy", lambda v: "static_8", "a second row of static_8"),
        (0, "backend", lambda v: "cached", "produced on the cached backend"),
    ],
)
def test_an_edit_of_any_column_is_caught(run_dir, live, tmp_path, row, column, edit, match):
    frame = raw_rows(run_dir / "per_window.csv")
    if column == "attention_flops_full":
        assert frame.loc[row, column] == "684195840.0", "the fifth digit is edited below"
    frame.loc[row, column] = edit(frame.loc[row, column])
    frame.to_csv(tmp_path / "edited.csv", index=False)
    with pytest.raises((ReplayMismatch, ValueError), match=match):
        replay_csv(tmp_path / "edited.csv", live, run_config=run_dir / "config.json")


def test_a_policy_edited_in_its_leaderboard_file_is_caught(run_dir, live):
    source = run_dir / "leaderboard" / "calibrated" / "static_8.csv"
    frame = raw_rows(source)
    frame.loc[0, "policy"] = "full_rank"  # a baseline of the run, but not this file's
    edited = source.with_name("energy_0.9.csv")
    original = edited.read_bytes()
    try:
        frame.to_csv(edited, index=False)
        with pytest.raises(ReplayMismatch, match="policy is 'full_rank' in the leaderboard file"):
            replay_csv(edited, live)
    finally:
        edited.write_bytes(original)


def test_an_unknown_column_fails_loudly(run_dir, live, tmp_path):
    frame = raw_rows(run_dir / "per_window.csv").assign(wall_s="1.5")
    frame.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(
        ValueError, match=r"does not know how to check the column\(s\) \['wall_s'\]"
    ):
        replay_csv(tmp_path / "extra.csv", live, run_config=run_dir)


def test_labels_without_a_reference_fail_and_the_call_can_give_one(run_dir, live, tmp_path):
    frame = raw_rows(run_dir / "per_window.csv")
    frame.to_csv(tmp_path / "copied.csv", index=False)  # outside the run folder
    with pytest.raises(ValueError, match=r"label column\(s\) \['policy', 'kind', 'seed'\]"):
        replay_csv(tmp_path / "copied.csv", live)
    labels = {"policy": list(frame["policy"]), "kind": ["rl", "baseline"], "seed": 0}
    assert len(replay_csv(tmp_path / "copied.csv", live, labels=labels)) == len(frame)
    with pytest.raises(ReplayMismatch, match=r"data row 1 \('ppo_mlp', window 0\): seed is 0"):
        replay_csv(tmp_path / "copied.csv", live, labels={**labels, "seed": 3})


@pytest.mark.parametrize(
    ("row", "column", "value", "match"),
    [
        (1, "actions", "[[4, 4], [2, 2", r"row 2 \('full_rank', window 0\), column 'actions'"),
        (0, "return", "8.38x", r"row 1 \('ppo_mlp', window 0\), column 'return': '8.38x' is not a"),
        (2, "seed", "zero", r"row 3 \('static_8', window 0\), column 'seed': 'zero' is not an int"),
        (0, "rewards", "[0.5, oops]", r"data row 1 .*column 'rewards': not JSON"),
        (0, "ranks", "[[40, 40], [24]]", r"data row 1 .*column 'ranks': not a table of numbers"),
    ],
)
def test_an_unparseable_field_names_its_row_and_column(
    run_dir, live, tmp_path, row, column, value, match
):
    from agents.evaluation import CsvFormatError

    frame = raw_rows(run_dir / "per_window.csv")
    frame.loc[row, column] = value
    frame.to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(CsvFormatError, match=match):
        replay_csv(tmp_path / "broken.csv", live, run_config=run_dir)


# -- 2. configuration and reset messages name the field, the value and what is allowed --------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"eval_fraction": "0.2"}, "eval_fraction must be a number in (0, 1)"),
        ({"eval_fraction": None}, "eval_fraction must be a number in (0, 1)"),
        ({"cache_dir": 5}, "cache_dir must be a cache folder (a str or os.PathLike path) or None"),
        ({"data_path": 123}, "data_path must be a corpus file or folder (a str or os.PathLike"),
        ({"data_path": ""}, "data_path='' is an empty path; pass a corpus file or folder"),
        ({"max_perturbation": True}, "max_perturbation must be a number in [0, 1]"),
    ],
)
def test_config_messages_name_field_value_and_allowed(changes, message):
    with pytest.raises(ValueError) as raised:
        EnvConfig(**changes)
    text = str(raised.value)
    assert message in text
    assert repr(next(iter(changes.values()))) in text


def test_a_path_object_is_kept_as_its_string(tmp_path):
    config = EnvConfig(cache_dir=tmp_path, data_path=tmp_path / "corpus.txt")
    assert config.cache_dir == str(tmp_path)
    assert config.data_path == str(tmp_path / "corpus.txt")


def test_reset_options_must_be_a_dict(run_dir, cache):
    env = gym.make("DRRL-Tiny-v0", cache_dir=cache, max_windows=1)
    with pytest.raises(
        ValueError, match=r"options='window' must be a dict such as \{'window': 0\}"
    ):
        env.reset(options="window")


# -- 3. compare_agents validates seeds before the first write ----------------------------------


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ((-1,), "seeds: -1 (int) is not a seed; seeds are ints in 0..4294967295"),
        ((0, 2**32), "seeds: 4294967296 (int) is not a seed"),
        ((1.5,), "seeds: 1.5 (float) is not a seed"),
        ((True,), "seeds: True (bool) is not a seed"),
        ((3, 3), "seeds: 3 is given twice"),
    ],
)
def test_compare_agents_refuses_bad_seeds_before_writing(tmp_path, seeds, message):
    from agents.compare import Args

    with pytest.raises(ArgumentError) as raised:
        Args(env_id="DRRL-Tiny-v0", seeds=seeds, device="cpu", out_dir=str(tmp_path / "out"))
    assert message in str(raised.value)
    assert not (tmp_path / "out").exists()


# -- 4. a vectorized live env starts, steps and closes ----------------------------------------

VECTOR_LIVE = textwrap.dedent(
    """
    import sys

    import gymnasium as gym
    import torch

    import drrl_env  # noqa: F401

    # The parent runs its kernels on a thread pool (as on any machine with several cores)
    # before the workers are forked: the pool does not survive a fork.
    torch.set_num_threads(2)
    vector = gym.make_vec(
        "DRRL-Tiny-Live-v0",
        num_envs=2,
        vectorization_mode="async",
        vector_kwargs={"context": "fork"},
        max_windows=2,
        cache_dir=sys.argv[1],
    )
    vector.reset(seed=0)
    full = int(vector.single_action_space.n) - 1
    _, reward, terminated, _, _ = vector.step([full, full])
    vector.close()
    print("ok", reward.shape, bool(terminated.any()))
    """
)


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork start method"
)
def test_async_vector_live_env_does_not_hang(cache):
    process = subprocess.Popen(
        [sys.executable, "-c", VECTOR_LIVE, cache],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers can be killed with it
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("gym.make_vec of a live id hung for 120 s (workers forked after torch threads)")
    assert process.returncode == 0, stderr[-3000:]
    assert "ok (2,) False" in stdout

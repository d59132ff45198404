"""``compare_agents.py --executor ray``: the tables of the local run, from Ray tasks.

The tiny configuration runs once with ``--executor local`` (under ``-X importtime``, to check
that the local default never imports Ray) and once with ``--executor ray`` on a local Ray
instance of 2 CPUs started by the script. Both must write the same per-window and summary
tables and the same files; only wall-time columns may differ.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from drrl_env.executors import LOCAL_WORKER_NICENESS, ray_session
from harness.runs import execute

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'drrl-gym[ray]'")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "compare_agents.py"
TINY = [
    "--env-id",
    "DRRL-Tiny-v0",
    "--methods",
    "calibrated",
    "--agents",
    "ppo:mlp",
    "maskable_ppo:mlp",
    "--total-timesteps",
    "256",
    "--train-windows",
    "2",
    "--eval-windows",
    "2",
    "--static-ranks",
    "16",
    "--energy-taus",
    "0.9",
    "--threads",
    "1",
]
RAY_IMPORT = re.compile(r"\|\s+ray(\.|\s*$)", re.MULTILINE)


def run_script(out: Path, cache: Path, name: str, *extra: str, python: tuple[str, ...] = ()):
    env = {**os.environ, "DRRL_CACHE_DIR": str(cache), "COLUMNS": "1000"}
    command = [sys.executable, *python, str(SCRIPT), *TINY, "--out-dir", str(out)]
    done = subprocess.run(
        [*command, "--run-name", name, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ray-results")
    cache = tmp_path_factory.mktemp("ray-cache")
    local = run_script(out, cache, "local", python=("-X", "importtime"))
    run_script(out, cache, "ray", "--executor", "ray", "--ray-num-cpus", "2")
    return out, local


def without_wall_time(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if "wall" in c])


def test_local_executor_never_imports_ray(runs):
    _, local = runs
    assert "import time:" in local.stderr
    assert not RAY_IMPORT.search(local.stderr), RAY_IMPORT.search(local.stderr)


def test_ray_executor_writes_the_tables_of_the_local_run(runs):
    out, _ = runs
    local, remote = out / "local", out / "ray"
    for name in ("per_window.csv", "summary.csv"):
        pd.testing.assert_frame_equal(
            without_wall_time(pd.read_csv(remote / name)),
            without_wall_time(pd.read_csv(local / name)),
        )
    leaderboards = sorted(p.relative_to(local) for p in (local / "leaderboard").rglob("*.csv"))
    assert leaderboards == sorted(
        p.relative_to(remote) for p in (remote / "leaderboard").rglob("*.csv")
    )
    assert len(leaderboards) == 2 + 5  # two agents; full, static, energy, random, greedy
    for relative in leaderboards:
        pd.testing.assert_frame_equal(pd.read_csv(remote / relative), pd.read_csv(local / relative))
    for folder in ("models", "tensorboard"):
        names = sorted(p.name for p in (local / folder).iterdir())
        assert names == sorted(p.name for p in (remote / folder).iterdir()), folder
    assert (remote / "table.md").read_text() == (local / "table.md").read_text()


def test_execute_on_ray_yields_every_result_as_it_finishes():
    assert not ray.is_initialized()
    with ray_session(num_cpus=2):
        tasks = [(2, 3), (3, 2), (5, 1)]
        results = dict(execute(lambda pair: pair[0] ** pair[1], tasks, "ray", cpus_per_task=1))
        # a local instance's workers run at normal priority, not Ray's nice 15
        niceness = set(dict(execute(lambda _: os.nice(0), [0, 1], "ray")).values())
    assert not ray.is_initialized()
    assert results == {(2, 3): 8, (3, 2): 9, (5, 1): 5}
    assert niceness == {os.nice(0) + LOCAL_WORKER_NICENESS}

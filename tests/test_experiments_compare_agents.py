"""experiments/compare_agents.py on the tiny model: outputs, run folders, resume, validation.

One uninterrupted run (module fixture) is the reference; an interrupted-then-resumed run and
an overwritten run must end with the same tables. Bad arguments must fail before any run
folder is made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from script_runner import load_script, run_in_process
from stable_baselines3.common.save_util import load_from_zip_file

from agents import read_csv, replay_csv
from drrl_env.replay import live_env
from harness.reporting import markdown_table
from harness.runs import ArgumentError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "compare_agents.py"
TINY = [
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
    "--threads",
    "1",
    "--beta",
    "0.25",
    "--gamma",
    "0.05",
]
TABLES = ("per_window.csv", "summary.csv")


def script_env(cache: Path) -> dict[str, str]:
    # wide enough that no error message is wrapped
    return {**os.environ, "DRRL_CACHE_DIR": str(cache), "COLUMNS": "1000"}


def command(out: Path, run_name: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *TINY, "--out-dir", str(out), "--run-name", run_name]


def run(out: Path, run_name: str, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """The script with ``TINY`` and ``extra``, run in this process (see ``script_runner``)."""
    args = [*TINY, "--out-dir", str(out), "--run-name", run_name, *extra]
    return run_in_process("experiments/compare_agents.py", args, {"DRRL_CACHE_DIR": str(cache)})


def one_line(text: str) -> str:
    """``text`` without line breaks, box characters and repeated spaces."""
    return " ".join(text.replace("│", " ").split())


def assert_same_tables(left: Path, right: Path) -> None:
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(left / name), pd.read_csv(right / name))
    for csv in sorted((left / "leaderboard").rglob("*.csv")):
        other = right / csv.relative_to(left)
        pd.testing.assert_frame_equal(pd.read_csv(csv), pd.read_csv(other))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "compare-cache"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def run_dir(out, cache_dir) -> Path:
    done = run(out, "smoke", cache_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "smoke"


def test_outputs_exist_and_parse(run_dir):
    for name in ("per_window.csv", "summary.csv", "table.md", "pareto.png", "config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["methods"] == ["calibrated"]
    assert config["args"]["total_timesteps"] == 256 and config["wall_s"] > 0
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
    # Exact attention in the calibrated env still rotates each new key once (its features).
    assert -10 < full["flops_reduction_pct"] < 0
    assert (run_dir / "table.md").read_text().strip() == markdown_table(summary).strip()


def test_per_window_rows_in_table_order(run_dir):
    frame = pd.read_csv(run_dir / "per_window.csv")
    policies = list(dict.fromkeys(frame["policy"]))
    assert policies[:2] == ["ppo_mlp", "maskable_ppo_transformer"]
    assert policies[2:] == [
        "full_rank",
        "static_8",
        "static_32",
        "energy_0.9",
        "uniform_random",
        "greedy_oracle",
    ]
    assert (frame.groupby("policy").size() == 2).all()
    assert set(frame["kind"]) == {"rl", "baseline"}


def test_leaderboard_csv_replays(run_dir, cache_dir):
    path = run_dir / "leaderboard" / "calibrated" / "static_32.csv"
    frame = read_csv(path)
    assert frame["perplexity"].notna().all()
    config = json.loads(frame["env_config"].iloc[0])
    assert (config["beta"], config["gamma"]) == (0.25, 0.05)  # the run's weights, not defaults
    env = live_env(**config, cache_dir=str(cache_dir))
    assert len(replay_csv(path, env)) == 2


# -- run folders: refuse, resume, overwrite ---------------------------------------------------


def test_second_run_with_the_same_name_is_refused(run_dir, out, cache_dir):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    done = run(out, "smoke", cache_dir)
    assert done.returncode == 2
    assert f"error: run folder {run_dir} already holds a run" in done.stderr
    assert "--resume" in done.stderr and "--overwrite" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_resume_with_other_arguments_is_refused(run_dir, out, cache_dir):
    done = run(out, "smoke", cache_dir, "--resume", "--total-timesteps", "512", "--threads", "2")
    assert done.returncode == 2
    message = one_line(done.stderr)
    assert "arguments that change results differ from its config.json" in message
    assert "total_timesteps (run: 256, now: 512)" in message
    assert "threads" not in message  # the thread count does not change what is computed


def test_resume_of_a_finished_run_changes_no_table(run_dir, out, cache_dir, tmp_path):
    """A finished run as committed (no models/, no tensorboard/) resumes without training."""
    copy = out / "finished-copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("models", "tensorboard"))
    done = run(out, "finished-copy", cache_dir, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    stdout = one_line(done.stdout)
    assert "8 of 8 trials and baselines finished" in stdout
    assert "2 finished trials have no saved model" in stdout
    assert "trained (" not in stdout  # no trial trained again
    assert not (copy / "models").exists()
    for name in (*TABLES, "table.md"):
        assert (copy / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert json.loads((copy / "config.json").read_text())["resumed"] == 1


def interrupt_after_first_trial(out: Path, run_name: str, cache_dir: Path):
    """Start a run, SIGINT it once the first trial's rows are written; None if it ended first.

    The tiny run's remaining work takes seconds, so on a busy machine it can finish before the
    signal arrives: the caller then tries again under another run name.
    """
    log = out / run_name / "per_window.csv"
    process = subprocess.Popen(
        command(out, run_name),
        cwd=ROOT,
        env=script_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test run before may leave SIGINT ignored here, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            assert process.returncode == 0, stdout + stderr
            return None  # finished before the first look
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # the first trial is written, the second one training
    stdout, _ = process.communicate(timeout=120)
    return None if process.returncode == 0 else (process.returncode, stdout)


def test_ctrl_c_keeps_finished_rows_and_resume_gives_the_same_tables(run_dir, out, cache_dir):
    for attempt in range(4):
        name = f"interrupted{attempt}"
        interrupted = interrupt_after_first_trial(out, name, cache_dir)
        if interrupted is not None:
            break
    else:
        pytest.fail(
            "every run finished before its SIGINT arrived; SIGINT handler here: "
            f"{signal.getsignal(signal.SIGINT)!r}"
        )
    returncode, stdout = interrupted
    assert returncode == 130
    assert f"rerun with --run-name {name} --resume" in one_line(stdout)
    kept = pd.read_csv(out / name / "per_window.csv")
    assert list(dict.fromkeys(kept["policy"]))[0] == "ppo_mlp" and len(kept) >= 2
    assert not (out / name / "summary.csv").exists()

    done = run(out, name, cache_dir, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    assert_same_tables(run_dir, out / name)
    assert len(list((out / name / "models").glob("*.zip"))) == 2


def test_overwrite_starts_from_an_empty_folder(run_dir, out, cache_dir):
    target = out / "overwritten"
    shutil.copytree(run_dir, target)
    (target / "models" / "stale__ppo_mlp__9.zip").write_bytes(b"stale")
    (target / "leaderboard" / "calibrated" / "stale.csv").write_text("policy\nstale\n")
    done = run(out, "overwritten", cache_dir, "--overwrite", "--n-envs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (target / "models" / "stale__ppo_mlp__9.zip").exists()
    assert not (target / "leaderboard" / "calibrated" / "stale.csv").exists()
    assert json.loads((target / "config.json").read_text())["args"]["n_envs"] == 2
    # --n-envs 2: agents trained on two SubprocVecEnv copies, same tables otherwise
    for model in sorted((target / "models").glob("*.zip")):
        data, _, _ = load_from_zip_file(model, load_data=True)
        assert data["n_envs"] == 2, model.name
    summary = pd.read_csv(target / "summary.csv")
    reference = pd.read_csv(run_dir / "summary.csv")
    assert summary[["method", "policy", "kind"]].equals(reference[["method", "policy", "kind"]])
    baselines = summary["kind"] == "baseline"
    pd.testing.assert_frame_equal(summary[baselines], reference[baselines])


# -- validation before any write --------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--agents", "ppo:mlp", "sac:mlp"], "agents: 'sac:mlp'"),
        (["--agents", "ppo:cnn"], "agents: 'ppo:cnn'"),
        (["--methods", "gram", "pca"], "methods: 'pca'"),
        (["--total-timesteps", "0"], "total_timesteps must be >= 1"),
        (["--env-id", "DRRL-Tiny-v0", "--beta", "-1"], "beta must be a finite number"),
        (["--beta", "0.3"], "budget=0.4 replaces the FLOPs and perturbation weights"),
        (["--env-id", "nope"], "env_id: 'nope' is not a registered DRRL id; registered: DRRL-"),
        (["--energy-taus", "0.9", "1.5"], "energy_taus: 1.5 is outside (0, 1]"),
        (["--run-name", "../escape"], "run_name='../escape' must be a single folder name"),
        (["--address", "10.0.0.1:6379"], "address is a Ray option; pass --executor ray"),
        pytest.param(
            ["--device", "cuda"],
            "device='cuda' but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_bad_arguments_fail_before_any_work(flags, message, tmp_path):
    out = tmp_path / "results"
    args = [*flags, "--out-dir", str(out)]
    cache = {"DRRL_CACHE_DIR": str(tmp_path / "cache")}
    done = run_in_process("experiments/compare_agents.py", args, cache)
    assert done.returncode != 0
    assert one_line(message) in one_line(done.stderr)
    assert not any(tmp_path.iterdir()), "nothing may be written or cached before the check"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"agents": ("ppo:mlp", "ppo")}, "agents: 'ppo:mlp' is given twice"),
        ({"seeds": (0, 0)}, "seeds: 0 is given twice"),
        ({"seeds": ()}, "seeds must name at least one seed"),
        ({"n_envs": 0}, "n_envs must be >= 1"),
        ({"static_ranks": (0,)}, "static_ranks: 0 is not a rank"),
        ({"energy_taus": (0.0,)}, "energy_taus: 0.0 is outside (0, 1]"),
        ({"run_name": "a/b"}, "run_name='a/b' must be a single folder name"),
        ({"run_name": "/abs"}, "run_name='/abs' must be a single folder name"),
        ({"run_name": ".."}, "run_name='..' must be a single folder name"),
        ({"resume": True}, "resume needs run_name"),
        ({"run_name": "x", "overwrite": True, "resume": True}, "overwrite and resume exclude"),
        ({"ray_num_cpus": 2}, "ray_num_cpus is a Ray option"),
        ({"device": "gpu"}, "device='gpu' is not a torch device"),
        ({"quick": True, "full": True}, "quick and full exclude each other"),
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"segment_length": -128}, "segment_length must be >= 1"),
        ({"seq_len": 500}, "seq_len=500 is not a multiple of segment_length=128"),
    ],
)
def test_args_checks_name_the_argument(changes, message):
    script = load_script("experiments/compare_agents.py")
    with pytest.raises(ArgumentError) as raised:
        script.Args(**{"env_id": "DRRL-Tiny-v0", "device": "cpu", **changes})
    assert message in str(raised.value)


def test_presets_fill_the_arguments_left_at_their_defaults():
    script = load_script("experiments/compare_agents.py")
    plain = script.Args(env_id="DRRL-Tiny-TopP-Budget-v0", device="cpu").resolved()
    assert plain.methods == ("topp",)  # the id's own method
    assert (plain.seq_len, plain.budget, plain.eval_windows) == (None, None, 12)
    quick = script.Args(env_id="DRRL-Tiny-TopP-Budget-v0", device="cpu", quick=True).resolved()
    from agents.compare import QUICK

    assert {name: getattr(quick, name) for name in QUICK} == QUICK
    assert quick.env_kwargs("topp")["seq_len"] == 512
    assert quick.env_kwargs("topp")["segment_length"] == 128
    given = script.Args(
        env_id="DRRL-Tiny-TopP-Budget-v0", device="cpu", quick=True, eval_windows=3, budget=0.5
    ).resolved()
    assert (given.eval_windows, given.budget, given.train_windows) == (3, 0.5, 6)
    full = script.Args(env_id="DRRL-Tiny-v0", device="cpu", full=True).resolved()
    assert full.seeds == (0, 1, 2) and full.total_timesteps == 100_000
    assert full.methods == ("calibrated",) and full.seq_len is None
    assert full.resolved() == full


def test_cuda_message_says_how_to_install():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ArgumentError) as raised:
        load_script("experiments/compare_agents.py").Args(device="cuda")
    assert "install a CUDA build of torch" in str(raised.value)
    assert "device='cpu'" in str(raised.value)


def test_static_rank_outside_the_grid_fails_before_the_run_folder(tmp_path, cache_dir):
    out = tmp_path / "results"
    done = run(out, "bad-rank", cache_dir, "--static-ranks", "8", "12")
    assert done.returncode == 2
    assert (
        "error: static_ranks: [12] not in the rank grid [8, 16, 24, 32, 40, 48, 56, 64] of "
        "DRRL-Tiny-v0 (method calibrated)" in done.stderr
    )
    assert not out.exists(), "no run folder before the arguments are checked"

"""Smoke runs of the experiment scripts on the tiny model: every output exists and parses.

Each script runs with a fresh cache folder in the test process, as its command line would
(``script_runner``; the first ``flops_scaling`` run is a subprocess with one torch thread, its
``__main__`` line included); every Markdown table it writes must equal the table regenerated
from its CSV by the script's own renderer.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from script_runner import load_script, run_in_process

import drrl_env  # noqa: F401 (registers the ids)
from agents import evaluate_policy_on_windows, load_agent, make_agent, read_csv

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TINY_RANKS = tuple(range(8, 65, 8))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_script(
    relative: str, args: list[str], cache: Path, check: bool = True, own_process: bool = False
) -> subprocess.CompletedProcess:
    """Run a script with ``cache`` as its cache folder, in this process (``own_process``: as
    a subprocess with one torch thread); with ``check`` its exit code must be 0."""
    if own_process:
        env = {
            **os.environ,
            "DRRL_CACHE_DIR": str(cache),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "COLUMNS": "1000",  # no wrapped error messages
        }
        result = subprocess.run(
            [sys.executable, str(ROOT / relative), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    else:
        result = run_in_process(relative, args, {"DRRL_CACHE_DIR": str(cache)})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG


def assert_markdown_from_csv(md_path: Path, table: str, rows: int) -> None:
    """The Markdown file ends with ``table`` (regenerated from the CSV), one line per row."""
    text = md_path.read_text()
    assert text.endswith(table), text
    assert len(table.strip().splitlines()) == rows + 2


def snapshot(folder: Path) -> dict[Path, int]:
    """Every file under ``folder`` with its modification time."""
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")}


def assert_refused(script: str, args: list[str], folder: Path, cache: Path) -> None:
    """A second run into ``folder`` without --overwrite/--resume exits 2, naming both
    flags, and writes nothing."""
    before = snapshot(folder)
    done = run_script(script, args, cache, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: run folder {folder} already holds a run; pass --resume" in done.stderr
    assert "--overwrite" in done.stderr
    assert snapshot(folder) == before


# -- experiments/flops_scaling.py ---------------------------------------------------------------


FLOPS = [
    "--lengths",
    "64",
    "128",
    "--ranks",
    "8",
    "16",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def flops_dir(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("flops_scaling")
    args = [*FLOPS, "--out-dir", str(out)]
    run_script("experiments/flops_scaling.py", args, cache, own_process=True)  # __main__ too
    return out / "flops_scaling"  # the default run name


SCRIPTS = sorted(
    str(path.relative_to(ROOT))
    for folder in ("experiments", "benchmarks")
    for path in (ROOT / folder).glob("*.py")
)


@pytest.mark.parametrize("relative", SCRIPTS)
def test_every_script_runs_main_as_the_tests_do(relative):
    """The tests run scripts in-process through ``run_main(main, tyro.cli(Args))``, which
    must be what each script's ``__main__`` block runs."""
    tree = ast.parse((ROOT / relative).read_text())
    last = tree.body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'"
    assert [ast.unparse(node) for node in last.body] == ["run_main(main, tyro.cli(Args))"]


def test_flops_scaling_outputs(flops_dir):
    script = load_script("experiments/flops_scaling.py")
    csv = flops_dir / "flops_scaling_cpu.csv"
    table = pd.read_csv(csv)
    assert list(table.columns) == list(script.COLUMNS)
    assert len(table) == 2 * (2 + 3 * 2)
    assert set(table["kernel"]) == {"sdpa", "eager", "gram", "svd", "calibrated"}
    assert (table["time_ms"] > 0).all()
    full = table[table["kernel"].isin(["sdpa", "eager"])]
    assert (full["flops_ratio"] == 1.0).all() and full["ceiling_ratio"].isna().all()
    lowrank = table[~table["kernel"].isin(["sdpa", "eager"])]
    assert (lowrank["ceiling_ratio"] == 1 - (64 - lowrank["rank"]) / 128).all()
    assert (lowrank["flops_ratio"] >= lowrank["ceiling_ratio"]).all()  # nothing beats the bound
    assert_markdown_from_csv(flops_dir / "flops_scaling_cpu.md", script.to_markdown(table), 16)
    assert_png(flops_dir / "flops_scaling_cpu.png")
    config = json.loads((flops_dir / "config.json").read_text())
    assert config["args"]["lengths"] == [64, 128]
    assert config["kernels"][0] == ["gram", 8, "--ranks"] and config["device"] == "cpu"
    assert config["threads"] == 1 and config["wall_s"] > 0


def test_flops_scaling_refuses_an_earlier_run_and_resumes_by_measuring_again(tmp_path, cache):
    folder = tmp_path / "flops_scaling"
    bad = [*FLOPS, "--ranks", "80", "--out-dir", str(tmp_path)]
    done = run_script("experiments/flops_scaling.py", bad, cache, check=False)
    assert done.returncode == 2 and "ranks must be in 1..head_dim=64" in done.stderr
    assert not folder.exists()
    args = [*FLOPS, "--lengths", "64", "--out-dir", str(tmp_path)]
    run_script("experiments/flops_scaling.py", args, cache)
    assert_refused("experiments/flops_scaling.py", args, folder, cache)
    run_script("experiments/flops_scaling.py", [*args, "--resume"], cache)
    assert len(pd.read_csv(folder / "flops_scaling_cpu.csv")) == 2 + 3 * 2
    assert json.loads((folder / "config.json").read_text())["resumed"] == 1


def test_flops_scaling_ranks_from_summary(tmp_path):
    script = load_script("experiments/flops_scaling.py")
    summary = pd.DataFrame(
        {
            "method": ["gram", "gram", "svd", "gram"],
            "policy": ["ppo_mlp", "dqn_mlp", "ppo_mlp", "static_16"],
            "kind": ["rl", "rl", "rl", "baseline"],
            "mean_rank": [23.6, 24.4, 40.2, 16.0],
        }
    )
    path = tmp_path / "summary.csv"
    summary.to_csv(path, index=False)
    kernels = script.lowrank_kernels(script.Args(from_summary=path, ranks=(16, 40)))
    assert kernels == [
        ("gram", 16, "--ranks"),
        ("gram", 40, "--ranks"),
        ("svd", 16, "--ranks"),
        ("svd", 40, "--ranks ppo_mlp"),
        ("gram", 24, "ppo_mlp dqn_mlp"),
    ]
    summary[summary["kind"] == "baseline"].to_csv(path, index=False)
    with pytest.raises(ValueError, match="no RL row"):
        script.lowrank_kernels(script.Args(from_summary=path))


# -- experiments/pareto.py ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agents_csv(tmp_path_factory, cache) -> Path:
    """A per_window.csv with the columns experiments/compare_agents.py writes (untrained PPO)."""
    live = gym.make(
        "DRRL-Tiny-v0",
        split="eval",
        backend="live",
        max_windows=2,
        cache_dir=str(cache),
    )
    full_flops = float(
        live.unwrapped.backend_flops_full_per_layer().sum() * live.unwrapped.n_layers
    )
    frames = []
    for seed in (0, 1):
        model = make_agent("ppo", live, "mlp", seed=seed)
        frame = evaluate_policy_on_windows(model, live, [0, 1], name="ppo_mlp")
        frames.append(frame.assign(seed=seed, kind="rl"))
    path = tmp_path_factory.mktemp("agents") / "per_window.csv"
    pd.concat(frames, ignore_index=True).assign(
        method="calibrated", attention_flops_full=full_flops
    ).to_csv(path, index=False)
    return path


def pareto_args(agents_csv: Path, out: Path) -> list[str]:
    return [
        "--env-id",
        "DRRL-Tiny-v0",
        "--method",
        "calibrated",
        "--eval-windows",
        "2",
        "--energy-taus",
        "0.9",
        "0.99",
        "--agents-csv",
        str(agents_csv),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def pareto_dir(tmp_path_factory, cache, agents_csv) -> Path:
    out = tmp_path_factory.mktemp("pareto")
    run_script("experiments/pareto.py", pareto_args(agents_csv, out), cache)
    return out / "calibrated"  # the default run name: the method


def test_pareto_outputs(pareto_dir):
    from harness.reporting import pareto_front

    script = load_script("experiments/pareto.py")
    front = pd.read_csv(pareto_dir / "front.csv")
    statics = {f"static_{r}" for r in TINY_RANKS[:-1]}
    assert set(front["policy"]) == {"full_rank", *statics, "energy_0.9", "energy_0.99", "ppo_mlp"}
    assert dict(zip(front["policy"], front["family"], strict=True))["ppo_mlp"] == "rl"
    agent = front[front["policy"] == "ppo_mlp"].iloc[0]
    assert agent["seeds"] == 2 and agent["windows"] == 2
    full = front[front["policy"] == "full_rank"].iloc[0]
    assert full["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9)
    assert -10 < full["flops_reduction_pct"] < 0  # the calibrated method's key rotation
    assert front["pareto"].dtype == bool and front["pareto"].any()
    expected = pareto_front(front, "flops_reduction_pct", "delta_ppl_pct")
    assert front["pareto"].tolist() == expected.tolist()
    assert front["undominated_by_baselines"].dtype == bool
    assert_markdown_from_csv(pareto_dir / "front.md", script.to_markdown(front), len(front))
    assert_png(pareto_dir / "pareto.png")
    per_window = read_csv(pareto_dir / "per_window.csv")
    assert len(per_window) == 2 * (len(front) - 1) and per_window["perplexity"].notna().all()
    config = json.loads((pareto_dir / "config.json").read_text())
    assert config["windows"] == [0, 1] and config["env"]["backend"] == "live"
    assert config["args"]["run_name"] == "calibrated" and config["wall_s"] > 0


def test_pareto_refuses_an_earlier_run_and_resumes_it(pareto_dir, agents_csv, tmp_path, cache):
    folder = tmp_path / "calibrated"
    shutil.copytree(pareto_dir, folder)
    args = pareto_args(agents_csv, tmp_path)
    assert_refused("experiments/pareto.py", args, folder, cache)
    different = [*args, "--resume", "--eval-windows", "1"]
    refused = run_script("experiments/pareto.py", different, cache, check=False)
    assert refused.returncode == 2 and "eval_windows (run: 2, now: 1)" in refused.stderr
    complete = (folder / "per_window.csv").read_text()
    lines = complete.splitlines(keepends=True)
    # As if interrupted: energy_0.9 has one of its two windows, energy_0.99 none.
    (folder / "per_window.csv").write_text("".join(lines[:-3]))
    (folder / "front.csv").unlink()
    run_script("experiments/pareto.py", [*args, "--resume"], cache)
    assert (folder / "per_window.csv").read_text() == complete
    assert (folder / "front.csv").read_text() == (pareto_dir / "front.csv").read_text()
    assert json.loads((folder / "config.json").read_text())["resumed"] == 1


# -- experiments/reward_ablation.py -------------------------------------------------------------


ABLATION = [
    "--env-id",
    "DRRL-Tiny-v0",
    "--settings",
    "0.5",
    "0.1",
    "0.5",
    "0",
    "0",
    "0.1",
    "--total-timesteps",
    "256",
    "--train-windows",
    "2",
    "--eval-windows",
    "2",
    "--threads",
    "1",
    "--discount",
    "0.9",
]


@pytest.fixture(scope="module")
def ablation_dir(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("ablation")
    run_script("experiments/reward_ablation.py", [*ABLATION, "--out-dir", str(out)], cache)
    return out / "calibrated"


def test_reward_ablation_refuses_an_earlier_run(ablation_dir, cache):
    args = [*ABLATION, "--out-dir", str(ablation_dir.parent)]
    assert_refused("experiments/reward_ablation.py", args, ablation_dir, cache)


def test_reward_ablation_resumes_the_agents_it_lacks(ablation_dir, tmp_path, cache):
    folder = tmp_path / "calibrated"
    shutil.copytree(ablation_dir, folder)
    complete = (folder / "per_window.csv").read_text()
    lines = complete.splitlines(keepends=True)
    (folder / "per_window.csv").write_text("".join(lines[:-1]))  # (0, 0.1) cut short
    (folder / "ablation.csv").unlink()
    (folder / "models" / "beta0.5_gamma0__0.zip").unlink()  # finished, as committed: no model
    kept = snapshot(folder / "models")
    done = run_script(
        "experiments/reward_ablation.py", [*ABLATION, "--out-dir", str(tmp_path), "--resume"], cache
    )
    assert (folder / "per_window.csv").read_text() == complete  # training is seeded
    assert (folder / "ablation.csv").read_text() == (ablation_dir / "ablation.csv").read_text()
    models = snapshot(folder / "models")
    assert [path.name for path in models if models.get(path) != kept.get(path)] == [
        "beta0_gamma0.1__0.zip"
    ]
    assert not (folder / "models" / "beta0.5_gamma0__0.zip").exists()  # not trained again
    assert "1 finished agents have no saved model" in " ".join(done.stdout.split())
    logs = sorted(path.name for path in (folder / "tensorboard").iterdir())
    assert logs == ["beta0.5_gamma0.1__0_1", "beta0.5_gamma0__0_1", "beta0_gamma0.1__0_1"]
    config = json.loads((folder / "config.json").read_text())
    assert config["resumed"] == 1 and config["windows"] == [0, 1]


def test_reward_ablation_outputs(ablation_dir):
    script = load_script("experiments/reward_ablation.py")
    table = pd.read_csv(ablation_dir / "ablation.csv")
    assert list(table.columns) == list(script.COLUMNS)
    assert list(zip(table["beta"], table["gamma"], strict=True)) == [(0.5, 0.1), (0.5, 0), (0, 0.1)]
    assert list(table["terms"]) == ["default", "no perturbation term", "no FLOPs term"]
    assert table["perplexity"].isna().all()  # cached backend: no perplexity
    assert table["mean_fidelity"].between(0, 1).all() and (table["windows"] == 2).all()
    assert_markdown_from_csv(ablation_dir / "ablation.md", script.to_markdown(table), 3)
    assert_png(ablation_dir / "ablation.png")
    per_window = read_csv(ablation_dir / "per_window.csv")
    assert len(per_window) == 3 * 2
    weights = [json.loads(c) for c in per_window["env_config"]]
    assert [(w["beta"], w["gamma"]) for w in weights[::2]] == [(0.5, 0.1), (0.5, 0), (0, 0.1)]
    models = sorted((ablation_dir / "models").glob("*.zip"))
    assert len(models) == 3
    assert load_agent(models[0]).gamma == 0.9  # --discount reached the agent
    assert "ppo:mlp (discount 0.9)" in (ablation_dir / "ablation.md").read_text()
    assert json.loads((ablation_dir / "config.json").read_text())["backend"] == "cached"


def test_reward_ablation_table_carries_live_kl_with_intervals(ablation_dir):
    """Live rows (token KL, top-1 per window) give each setting its mean over windows and the
    95 % bootstrap interval; cached rows give ``n/a``."""
    from harness.statistics import mean_interval

    script = load_script("experiments/reward_ablation.py")
    cached = pd.read_csv(ablation_dir / "ablation.csv")
    assert cached["mean_kl"].isna().all() and cached["mean_kl_interval"].isna().all()  # "n/a"
    assert ",n/a,n/a," in (ablation_dir / "ablation.csv").read_text()
    per_window = pd.read_csv(ablation_dir / "per_window.csv")
    rng = np.random.default_rng(0)
    live = per_window.assign(
        mean_kl=rng.uniform(1e-3, 1e-2, len(per_window)),
        top1_agreement=rng.uniform(0.9, 1.0, len(per_window)),
        perplexity=20.0,
        perplexity_full=19.0,
    )
    table = script.ablation_table(live)
    for _, row in table.iterrows():
        mine = live[(live["beta"] == row["beta"]) & (live["gamma"] == row["gamma"])]
        kl = mean_interval(mine.groupby("window")["mean_kl"].mean())
        assert row["mean_kl"] == pytest.approx(kl.estimate)
        assert row["mean_kl_interval"] == kl.format(scientific=True)
        top1 = mean_interval(mine.groupby("window")["top1_agreement"].mean())
        assert row["top1_interval"] == top1.format()
    assert "token KL" in script.to_markdown(table)
    # eight windows of the default weights: still "default" (a mean of 8 x 0.1 is not 0.1)
    eight = pd.concat([live[live["window"] == 0].assign(window=w) for w in range(8)])
    eight = eight.sort_values(["beta", "gamma", "window"], ascending=False)  # as the log holds
    terms = script.ablation_table(eight).set_index(["beta", "gamma"])["terms"]
    assert terms[0.5, 0.1] == "default" and terms[0.0, 0.1] == "no FLOPs term"


# -- experiments/uniform_rank_table.py and experiments/reward_landscape.py ------------------------


UNIFORM = [
    "--model",
    "tiny-llama",
    "--seq-len",
    "128",
    "--segment-length",
    "64",
    "--n-windows",
    "1",
    "--methods",
    "svd",
    "gram",
    "calibrated",
    "topk",
    "--ranks",
    "16",
    "64",
    "--sparse-ranks",
    "16",
    "--keeps",
    "0.5",
    "--calibration-windows",
    "1",
    "--device",
    "cpu",
]
ROWS = 1 + 3 * 2 + 1  # full, 3 dense methods at 2 ranks, topk at one (rank, keep)


def test_uniform_rank_table_outputs(tmp_path, cache):
    script = load_script("experiments/uniform_rank_table.py")
    run_script("experiments/uniform_rank_table.py", [*UNIFORM, "--out-dir", str(tmp_path)], cache)
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == list(script.COLUMNS)
    assert len(table) == ROWS
    assert (table.loc[table["rank"] == 64, "ppl_vs_full"] == 0).all()
    topk = table[table["method"] == "topk"].iloc[0]
    assert topk["keep"] == 0.5  # at 128 tokens it keeps every key: min_keys is 64
    # Exact attention skipping masked scores executes less than the dense count.
    assert (table["flops_vs_causal"] > table["flops_ratio"]).all()
    full = table[table["method"] == "full"].iloc[0]
    assert (full["mean_kl_low"], full["mean_kl_high"], full["top1_low"]) == (0, 0, 1)
    bounds = ["mean_kl_low", "mean_kl_high", "top1_low", "top1_high"]
    assert (table.loc[table["rank"] == 64, bounds] == full[bounds]).all().all()  # the full run
    others = table[table["rank"] != 64]  # one window: no interval
    assert others[bounds].isna().all().all()
    markdown = script.markdown_from_csv(tmp_path / "table.csv", head_dim=64)
    assert (tmp_path / "table.md").read_text() == markdown
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["head_dim"] == 64
    assert config["args"]["ranks"] == [16, 64] and config["calibration"]["n_windows"] == 1
    # calibrated is per query head, topk selects with a basis per kv head.
    assert sorted(config["calibration"]["scopes"]) == ["kv_head", "query_head"]


def test_uniform_rank_table_shows_kl_and_top1_with_their_intervals(tmp_path):
    from harness.statistics import mean_interval

    script = load_script("experiments/uniform_rank_table.py")
    per_window = [1.0e-3, 3.0e-3, 2.5e-3]
    interval = mean_interval(per_window)
    assert script.quality_interval(per_window, 0.0) == (interval.low, interval.high)
    assert script.quality_interval([], 1.0) == (1.0, 1.0)  # the exact run compares nothing
    assert all(math.isnan(b) for b in script.quality_interval([0.5], 1.0))
    row = {c: "1" for c in script.COLUMNS} | {"method": "topk", "n_windows": "3"}
    row |= {"mean_kl": "0.002", "mean_kl_low": "0.0011", "mean_kl_high": "0.0029"}
    row |= {"top1_agreement": "0.97", "top1_low": "0.95", "top1_high": "0.99"}
    pd.DataFrame([row]).to_csv(tmp_path / "table.csv", index=False)
    markdown = script.markdown_from_csv(tmp_path / "table.csv")
    assert "| 2.00e-03 [1.10e-03, 2.90e-03] | 0.97 [0.95, 0.99] |" in markdown
    assert "mean_kl_low" not in markdown and "top1_high" not in markdown
    # a table written before the intervals existed renders its plain values
    old = pd.DataFrame([row]).drop(columns=["mean_kl_low", "mean_kl_high", "top1_low", "top1_high"])
    old.to_csv(tmp_path / "old.csv", index=False)
    assert "| 2.00e-03 | 0.970 |" in script.markdown_from_csv(tmp_path / "old.csv")


def test_uniform_rank_table_refuses_an_earlier_table_and_resumes_it(tmp_path, cache):
    out = tmp_path / "uniform"
    args = [*UNIFORM, "--out-dir", str(out)]
    run_script("experiments/uniform_rank_table.py", args, cache)
    complete = (out / "table.csv").read_text()
    again = run_script("experiments/uniform_rank_table.py", args, cache, check=False)
    assert again.returncode == 2 and f"error: run folder {out} already holds a run" in again.stderr
    assert (out / "table.csv").read_text() == complete

    lines = complete.splitlines(keepends=True)
    (out / "table.csv").write_text("".join(lines[:3]))  # header, full, svd 16: as if interrupted
    (out / "table.md").unlink()
    different = [*args, "--resume", "--n-windows", "2"]
    refused = run_script("experiments/uniform_rank_table.py", different, cache, check=False)
    assert refused.returncode == 2 and "n_windows (run: 1, now: 2)" in refused.stderr
    run_script("experiments/uniform_rank_table.py", [*args, "--resume"], cache)
    resumed, original = pd.read_csv(out / "table.csv"), pd.read_csv(io.StringIO(complete))
    pd.testing.assert_frame_equal(resumed.drop(columns="wall_s"), original.drop(columns="wall_s"))
    assert resumed["wall_s"][:2].tolist() == original["wall_s"][:2].tolist(), "rows kept"
    assert (out / "table.md").is_file()
    assert json.loads((out / "config.json").read_text())["resumed"] == 1

    (out / "stale.txt").write_text("from an earlier run")
    run_script("experiments/uniform_rank_table.py", [*args, "--overwrite"], cache)
    assert not (out / "stale.txt").exists() and len(pd.read_csv(out / "table.csv")) == ROWS


def test_uniform_rank_table_checks_ranks_before_writing(tmp_path, cache):
    out = tmp_path / "uniform"
    args = [*UNIFORM, "--ranks", "16", "80", "--out-dir", str(out)]  # the last --ranks counts
    done = run_script("experiments/uniform_rank_table.py", args, cache, check=False)
    assert done.returncode == 2
    assert "error: ranks: [80] exceed the head dim 64 of tiny-llama" in done.stderr
    assert not out.exists()
    bad = [*UNIFORM, "--methods", "gram", "pca", "--out-dir", str(out)]
    done = run_script("experiments/uniform_rank_table.py", bad, cache, check=False)
    assert done.returncode != 0
    assert "methods: ['pca'] not among full, gram" in done.stderr
    assert not out.exists()


def test_reward_landscape_outputs_refusal_and_resume(tmp_path, cache):
    script = load_script("experiments/reward_landscape.py")
    args = ["--env-id", "DRRL-Tiny-v0", "--out-dir", str(tmp_path)]
    run_script("experiments/reward_landscape.py", args, cache)
    folder = tmp_path / "reward_landscape"  # the default run name
    table = pd.read_csv(folder / "landscape.csv")
    statics = [f"static_{r}" for r in TINY_RANKS[:-1]]
    assert list(table["policy"]) == ["full_rank", *statics, "energy_0.95", "greedy_oracle"]
    assert_markdown_from_csv(folder / "landscape.md", script.to_markdown(table), len(table))
    config = json.loads((folder / "config.json").read_text())
    assert config["env"]["model"] == "tiny-llama" and config["args"]["split"] == "train"

    assert_refused("experiments/reward_landscape.py", args, folder, cache)
    complete, markdown = (
        (folder / "landscape.csv").read_text(),
        (folder / "landscape.md").read_text(),
    )
    (folder / "landscape.csv").write_text("".join(complete.splitlines(keepends=True)[:4]))
    (folder / "landscape.md").unlink()
    run_script("experiments/reward_landscape.py", [*args, "--resume"], cache)
    assert (folder / "landscape.csv").read_text() == complete
    assert (folder / "landscape.md").read_text() == markdown
    assert json.loads((folder / "config.json").read_text())["resumed"] == 1


def test_replay_tolerance_measures_the_spread_across_thread_counts(tmp_path, cache):
    args = ["--env-ids", "DRRL-Tiny-Live-v0", "--schedules", "1", "--out-dir", str(tmp_path)]
    bad = run_script("experiments/replay_tolerance.py", [*args, "--threads", "2"], cache, False)
    assert bad.returncode == 2 and "threads must be at least two counts" in bad.stderr
    assert not (tmp_path / "replay_tolerance").exists()
    run_script("experiments/replay_tolerance.py", args, cache)
    folder = tmp_path / "replay_tolerance"  # the default run name
    table = pd.read_csv(folder / "spread.csv")
    assert list(table["schedule"]) == ["exact", "random_1"]
    assert (table["threads"] == "1 vs 2").all() and table["within"].dtype == bool
    assert (table["reward_max_rel"] >= 0).all() and (table["perplexity_rel"] < 1e-3).all()
    assert "Every spread within the tolerances" in (folder / "spread.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["args"]["threads"] == [1, 2] and set(config["measure_s"]) == {"DRRL-Tiny-Live-v0"}
    assert_refused("experiments/replay_tolerance.py", args, folder, cache)
    # The thread counts are what it compares: a resume may not change them.
    other = run_script(
        "experiments/replay_tolerance.py", [*args, "--resume", "--threads", "1", "3"], cache, False
    )
    assert other.returncode == 2 and "threads (run: [1, 2], now: [1, 3])" in other.stderr

"""benchmarks/cache_agreement.py: two rollout caches of one configuration compared.

The comparison functions are checked on hand-made arrays (a difference must be found and
sized exactly); the script on two tiny caches built apart, which must agree bit for bit
(the builder is deterministic on one machine), and on every refused input.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from script_runner import load_script

from drrl_env.build_cache import Args as BuildArgs
from drrl_env.build_cache import cached_windows
from drrl_env.build_cache import main as build_cache
from drrl_env.inspect import env_config
from tests.test_experiments_scripts import run_script

SCRIPT = "benchmarks/cache_agreement.py"
ENV_ID = "DRRL-Tiny-TopP-v0"


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two cache roots, each with the first 2 train windows of the tiny top-p id (the second
    root also window 2), built by separate calls."""
    roots = [tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("other")]
    for root, windows in zip(roots, (2, 3), strict=True):
        build_cache(BuildArgs(ENV_ID, max_windows=windows, cache_dir=str(root), threads=1))
    return [str(root) for root in roots]


def test_cached_windows_lists_what_is_on_disk_and_builds_nothing(tmp_path, caches):
    for root, expected in zip(caches, ([0, 1], [0, 1, 2]), strict=True):
        windows, folder = cached_windows(env_config(ENV_ID, split="train", cache_dir=root))
        assert windows == expected and folder.startswith(root)
    empty = tmp_path / "empty"
    windows, _ = cached_windows(env_config(ENV_ID, split="train", cache_dir=str(empty)))
    assert windows == [] and not empty.exists()


def test_array_agreement_sizes_the_largest_difference(script):
    first = np.array([[1.0, -4.0], [2.0, 0.5]])
    second = first.copy()
    second[1, 0] += 0.002
    row = script.array_agreement("cosine", first, second)
    assert row["max_abs_diff"] == pytest.approx(0.002)
    assert row["max_abs_value"] == 4.0
    assert row["relative"] == pytest.approx(0.0005)
    same = script.array_agreement("cosine", first, first.copy())
    assert same["max_abs_diff"] == 0 and same["relative"] == 0
    zeros = script.array_agreement("kept", np.zeros(3), np.array([0.0, 1e-9, 0.0]))
    assert zeros["relative"] == np.inf  # a difference where the first holds only zeros
    with pytest.raises(ValueError, match=r"cosine: shapes \(2, 2\) and \(4,\) differ"):
        script.array_agreement("cosine", first, first.ravel())


def test_optimum_agreement_finds_a_flipped_choice(script):
    # 1 segment, 2 layers, 2 actions: cheap (cost 0.25) or exact (cost 0.5); budget 0.8
    # affords one exact layer. The first cache prefers exact on layer 0, the other on layer 1.
    costs = np.array([[[0.25, 0.5], [0.25, 0.5]]])
    first = np.array([[[0.5, 1.0], [0.6, 1.0]]])  # gains: layer 0 +0.5, layer 1 +0.4
    other = np.array([[[0.5, 1.0], [0.4, 1.0]]])  # gains: layer 0 +0.5, layer 1 +0.6
    row = script.optimum_agreement((first, other), (costs, costs), 0.8)
    assert row["actions"] == 2 and row["differing_actions"] == 2
    assert row["value_first"] == pytest.approx(1.6)  # exact on 0, cheap on 1
    assert row["value_loss_first"] == pytest.approx(1.6 - 1.5)
    assert row["value_loss_other"] == pytest.approx(1.6 - 1.5)
    agree = script.optimum_agreement((first, first + 1e-9), (costs, costs), 0.8)
    assert agree["differing_actions"] == 0 and agree["value_loss_first"] == 0


def test_shared_prefix_counts_windows_both_hold_from_zero(script):
    assert script.shared_prefix([0, 1, 2], [0, 1, 2, 3], None) == 3
    assert script.shared_prefix([0, 1, 3], [0, 1, 2, 3], None) == 2
    assert script.shared_prefix([0, 1, 2], [0, 1, 2], 1) == 1
    assert script.shared_prefix([1, 2], [0, 1, 2], None) == 0


def test_two_builds_agree_bit_for_bit(tmp_path, caches):
    first, other = caches
    args = ["--env-id", ENV_ID, "--split", "train", "--cache-dir", first]
    args += ["--other-cache-dir", other, "--budgets", "0.6", "0.5", "--out-dir", str(tmp_path)]
    run_script(SCRIPT, args, tmp_path / "unused")
    folder = tmp_path / "cache_agreement"
    arrays = pd.read_csv(folder / "arrays.csv")
    assert set(arrays["window"]) == {0, 1}  # the other's window 2 has no partner
    names = {"cosine", "dnll_taylor", "dnll_fisher", "flops", "kept", "spectra", "input_stats"}
    assert set(arrays["array"]) == names | {"nll_full", "mean_nll"}
    assert (arrays["max_abs_diff"] == 0).all()
    optimum = pd.read_csv(folder / "optimum.csv")
    assert sorted(zip(optimum["window"], optimum["budget"], strict=True)) == [
        (0, 0.5),
        (0, 0.6),
        (1, 0.5),
        (1, 0.6),
    ]
    assert (optimum["differing_actions"] == 0).all() and (optimum["value_loss_first"] == 0).all()
    assert (optimum["actions"] == 4 * 4).all()  # 4 segments x 4 layers of the tiny model
    markdown = (folder / "cache_agreement.md").read_text()
    assert markdown.startswith("2 windows compared.")
    assert "| 0.5 | 2 | 2 | 0 | 32 |" in markdown
    config = json.loads((folder / "config.json").read_text())
    assert config["windows"] == 2 and config["args"]["other_cache_dir"] == other


def test_refuses_a_budget_below_the_cheapest_schedule(tmp_path, caches):
    args = ["--env-id", ENV_ID, "--split", "train", "--cache-dir", caches[0]]
    args += ["--other-cache-dir", caches[1], "--budgets", "0.01", "--out-dir", str(tmp_path)]
    result = run_script(SCRIPT, args, tmp_path / "unused", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "budget 0.01, window 0: the cheapest choice of every item already exceeds" in (
        result.stderr
    )
    assert not (tmp_path / "cache_agreement").exists()


def test_refuses_a_cache_without_the_configuration(tmp_path, caches):
    empty = tmp_path / "empty"
    args = ["--env-id", ENV_ID, "--split", "train", "--cache-dir", caches[0]]
    args += ["--other-cache-dir", str(empty), "--out-dir", str(tmp_path)]
    result = run_script(SCRIPT, args, tmp_path / "unused", check=False)
    assert result.returncode == 2, result.stderr
    assert f"{empty} holds no rollouts of {ENV_ID} (train, its own settings)" in result.stderr
    assert not (tmp_path / "cache_agreement").exists()
    # the eval split was never built in either root
    args = ["--env-id", ENV_ID, "--cache-dir", caches[0], "--other-cache-dir", caches[1]]
    result = run_script(SCRIPT, [*args, "--out-dir", str(tmp_path)], tmp_path, check=False)
    assert result.returncode == 2 and "holds no rollouts of" in result.stderr
    assert "(eval, its own settings)" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--other-cache-dir is required"),
        (["--other-cache-dir", "x", "--max-windows", "0"], "max_windows must be >= 1, got 0"),
        (["--other-cache-dir", "x", "--budgets", "1.5"], "budgets must be in (0, 1], got (1.5,)"),
        (["--other-cache-dir", "x", "--env-id", "DRRL-Tiny-Live-v0"], "is not a cached id"),
        (["--other-cache-dir", "x", "--set", "seq_len=100"], "seq_len=100 is not a multiple of"),
    ],
)
def test_refuses_bad_arguments(tmp_path, extra, message):
    result = run_script(SCRIPT, [*extra, "--out-dir", str(tmp_path)], tmp_path, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr

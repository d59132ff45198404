"""Smoke runs of the benchmark scripts at toy sizes: their files exist and hold what they say.

Timings are never asserted (they are not pass/fail); the exact columns are: FLOPs ratios,
the SDPA row's ratio of 1, and the agreement of a fast path with its reference path.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from drrl_env.flops import full_attention_flops
from drrl_env.methods import make_method
from drrl_env.methods.base import CallShape, Setting
from tests.test_experiments_scripts import run_script

KERNELS = ["calibrated:8:1:fast", "topk:8:0.5:fast", "topk:8:0.5:reference"]
KERNELS += ["topp:8:0.5:fast", "topp:8:0.5:reference", "full:16:1:fused"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_kernel_flops_writes_every_length_and_kernel(tmp_path, cache):
    args = ["--lengths", "64", "128", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"]
    args += ["--kernels", *KERNELS, "--warmup", "0", "--repeats", "1", "--device", "cpu"]
    run_script("benchmarks/kernel_flops.py", [*args, "--out-dir", str(tmp_path)], cache)
    folder = tmp_path / "kernel_flops_cpu"  # the run folder's default name has the device
    table = pd.read_csv(folder / "kernel_flops_cpu.csv")
    assert len(table) == 2 * (2 + len(KERNELS))  # sdpa and full at each length, then the specs
    assert set(table["L"]) == {64, 128}
    assert (table.loc[table["kernel"] == "sdpa", "time_vs_sdpa"] == 1).all()
    assert (table.loc[table["kernel"].isin(["sdpa", "full"]), "flops_vs_full"] == 1).all()
    assert (table["time_ms"] > 0).all()
    flex = table[(table["kernel"] == "full") & (table["path"] == "fused")]
    assert len(flex) == 2 and (flex["flops_vs_full"] == 1).all()  # exact, in the fused kernel
    assert flex["cos_vs_full"].to_numpy() == pytest.approx(1.0, abs=1e-6)
    for length in (64, 128):
        topk = table[(table["kernel"] == "topk") & (table["L"] == length)]
        fast, reference = topk.set_index("path")["cos_vs_full"][["fast", "reference"]]
        assert fast == pytest.approx(reference, abs=1e-5)  # the same attention, two paths
        assert topk["flops_vs_full"].nunique() == 1  # one count for both paths
        # topp: the realised count of the timed call, the same keys on both paths; at
        # L=64 every query keeps all its keys (min_keys=64), at 128 some are dropped.
        topp = table[(table["kernel"] == "topp") & (table["L"] == length)].set_index("path")
        assert topp.loc["fast", "cos_vs_full"] == pytest.approx(
            topp.loc["reference", "cos_vs_full"], abs=1e-5
        )
        assert topp["flops_vs_full"].nunique() == 1
        assert (topp["note"] == "flops realised by the timed call").all()
        shape = CallShape(length, length, 16, 2, 1)
        upper = make_method("topp", 16, 1).flops(shape, Setting(8, 0.5)).total
        bound = upper / full_attention_flops(length, length, 16, 2).total
        realised = topp.loc["fast", "flops_vs_full"]
        assert realised == pytest.approx(bound) if length == 64 else realised < 0.95 * bound
    markdown = (folder / "kernel_flops_cpu.md").read_text()
    assert len(re.findall(r"^\| (64|128) \|", markdown, flags=re.M)) == len(table)
    config = json.loads((folder / "config.json").read_text())
    assert config["args"]["lengths"] == [64, 128] and config["args"]["kernels"] == KERNELS
    assert config["args"]["run_name"] == "kernel_flops_cpu" and config["wall_s"] > 0
    # a second run into the same folder is refused, and timings are never resumed
    for extra, message in [([], "already holds a run"), (["--resume"], "is not resumed")]:
        again = run_script(
            "benchmarks/kernel_flops.py",
            [*args, "--out-dir", str(tmp_path), *extra],
            cache,
            check=False,
        )
        assert again.returncode == 2 and message in again.stderr, again.stderr[-2000:]
    assert pd.read_csv(folder / "kernel_flops_cpu.csv").equals(table)


def test_kernel_flops_refuses_a_bad_spec_before_timing(tmp_path, cache):
    result = run_script(
        "benchmarks/kernel_flops.py",
        ["--kernels", "topk:8:fast", "--out-dir", str(tmp_path)],
        cache,
        check=False,
    )
    assert result.returncode == 2  # an argument error: its message, no traceback
    assert "error: kernel 'topk:8:fast' is not method:rank:keep:path" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "kernel_flops_cpu").exists()


def test_env_steps_sections(tmp_path, cache):
    args = ["--env-id", "DRRL-Tiny-v0", "--copies", "1", "2", "--steps", "50"]
    args += ["--live-methods", "calibrated", "--live-repeats", "1", "--max-windows", "2"]
    run_script("benchmarks/env_steps.py", [*args, "--out-dir", str(tmp_path)], cache)
    folder = tmp_path / "env_steps"
    table = pd.read_csv(folder / "env_steps.csv")
    single = table[table["section"] == "single"]
    assert len(single) == 1 and single["value"].iloc[0] > 0
    vector = table[table["section"] == "vector"]
    assert sorted(zip(vector["setup"], vector["copies"], strict=True)) == [
        ("cached, async", 1),
        ("cached, async", 2),
        ("cached, sync", 1),
        ("cached, sync", 2),
    ]
    assert (vector["value"] > 0).all()
    memory = table[table["section"] == "memory"]
    assert len(memory) == 4 and (memory["value"] > 0).all()
    live = table[table["section"] == "live"].set_index("setup")["value"]
    sdpa = live["plain SDPA forward of the window"]
    for label in ("exact", "cheapest"):
        (seconds,) = [v for k, v in live.items() if k.startswith(f"calibrated episode, {label} (")]
        ratio = live[f"calibrated episode, {label} / SDPA forward"]
        assert ratio == pytest.approx(seconds / sdpa)
    assert (folder / "env_steps.md").read_text().count("\n| live |") == len(live)
    config = json.loads((folder / "config.json").read_text())
    assert config["args"]["env_id"] == "DRRL-Tiny-v0" and config["args"]["steps"] == 50


def test_env_steps_refuses_an_unknown_section(tmp_path, cache):
    result = run_script(
        "benchmarks/env_steps.py",
        ["--env-id", "DRRL-Tiny-v0", "--sections", "vectors", "--out-dir", str(tmp_path)],
        cache,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown sections ['vectors']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "env_steps").exists()

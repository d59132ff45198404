"""experiments/proxy_validity.py on the tiny model: every schedule played twice, correlations."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from script_runner import run_in_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "proxy_validity.py"
TINY = [
    "--env-id", "DRRL-Tiny-TopK-v0",
    "--eval-windows", "1",
    "--random", "2",
    "--mixtures", "2",
    "--energy-taus", "0.9",
    "--greedy-betas", "0.3",
    "--threads", "1",
]  # fmt: skip
PLANNED = 15 + 2 + 2 + 1 + 3  # statics (pair grid), random, mixtures, energy, greedy per term


def run(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """The script with ``TINY`` and ``extra``, run in this process (see ``script_runner``)."""
    args = [*TINY, "--out-dir", str(out), *extra]
    return run_in_process("experiments/proxy_validity.py", args, {"DRRL_CACHE_DIR": str(cache)})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("proxy"), tmp_path_factory.getbasetemp() / "pv-cache"
    assert run(out, cache).returncode == 0
    return out / "proxy_validity", out, cache


def test_every_schedule_has_its_cached_proxies_and_live_perplexity(run_dir):
    folder, _, _ = run_dir
    rows = pd.read_csv(folder / "schedules.csv")
    assert len(rows) == PLANNED and rows["schedule"].is_unique
    for row in rows.to_dict("records"):
        actions = np.array(json.loads(row["actions"]))
        assert actions.shape == (4, 4)
        assert row["delta_log_ppl"] == pytest.approx(
            math.log(row["perplexity"] / row["perplexity_full"])
        )
    exact = rows[rows["schedule"] == "static_r64"].iloc[0]
    assert exact["sum_one_minus_cosine"] == pytest.approx(0, abs=1e-9)
    assert exact["sum_dnll_taylor"] == 0 and exact["delta_log_ppl"] == pytest.approx(0, abs=1e-9)
    assert exact["mean_kl"] == pytest.approx(0, abs=1e-9) and exact["top1_agreement"] == 1.0
    assert (rows["mean_kl"] >= 0).all() and rows["top1_agreement"].between(0, 1).all()


def test_correlations_are_computed_from_the_rows(run_dir):
    folder, _, _ = run_dir
    rows = pd.read_csv(folder / "schedules.csv")
    table = pd.read_csv(folder / "correlations.csv")
    assert set(table["term"]) == {"cosine", "loss", "loss-fisher"}
    for record in table.to_dict("records"):
        expected = rows[record["proxy"]].rank().corr(rows["delta_log_ppl"].rank())
        assert record["spearman"] == pytest.approx(expected)
        against_kl = rows[record["proxy"]].rank().corr(rows["mean_kl"].rank())
        assert record["spearman_kl"] == pytest.approx(against_kl)
        assert record["schedules"] == PLANNED
    assert (folder / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Spearman" in (folder / "correlations.md").read_text()


def test_resume_plays_nothing_twice_and_a_rerun_is_refused(run_dir):
    folder, out, cache = run_dir
    before = (folder / "schedules.csv").read_text()
    again = run(out, cache)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert run(out, cache, "--resume").returncode == 0
    assert (folder / "schedules.csv").read_text() == before

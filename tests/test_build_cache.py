"""python -m drrl_env.build_cache: builds ahead of training, resumes, splits, refuses bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from drrl_env.build_cache import Args, configs, main, parse_overrides
from drrl_env.envs.backends.cached import RolloutCache


def _counts(report: dict) -> tuple[int, int, int, int]:
    return tuple(report[k] for k in ("built", "already_built", "built_by_others", "repaired"))


def test_builds_each_split_once_then_nothing(tmp_path, capsys):
    args = Args("DRRL-Tiny-v0", splits=("train", "eval"), max_windows=2, cache_dir=str(tmp_path))
    first = main(args)
    assert {split: first[split]["built"] for split in ("train", "eval")} == {"train": 2, "eval": 2}
    assert _counts(first["train"]) == (2, 0, 0, 0)
    again = main(args)
    assert again["train"]["built"] == 0 and again["eval"]["built"] == 0
    assert _counts(again["eval"]) == (0, 2, 0, 0)
    assert '"train"' in capsys.readouterr().out
    more = main(Args("DRRL-Tiny-v0", max_windows=3, cache_dir=str(tmp_path)))
    assert more["train"]["built"] == 1 and more["train"]["windows"] == 3
    assert _counts(more["train"]) == (1, 2, 0, 0)
    rebuilt = main(Args("DRRL-Tiny-v0", max_windows=1, cache_dir=str(tmp_path), rebuild=True))
    assert _counts(rebuilt["train"]) == (1, 0, 0, 0) and rebuilt["train"]["windows"] == 1
    (config,) = configs(Args("DRRL-Tiny-v0", max_windows=1, cache_dir=str(tmp_path)))
    assert RolloutCache(config).store.indices() == [0]  # --rebuild deleted the others


def test_overrides_reach_the_configuration(tmp_path):
    (config,) = configs(
        Args("DRRL-Tiny-v0", set=("method=topk", "keeps=(0.25, 0.5)"), cache_dir=str(tmp_path))
    )
    assert config.method == "topk" and config.keeps == (0.25, 0.5) and config.backend == "cached"
    assert parse_overrides(("model=tiny-gpt2", "seq_len=256")) == {
        "model": "tiny-gpt2",
        "seq_len": 256,
    }


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (Args("DRRL-Nothing-v0"), "unknown id 'DRRL-Nothing-v0'; registered: DRRL-Wikitext-v0"),
        (Args("DRRL-Tiny-v0", workers=0), "workers must be >= 1"),
        (Args("DRRL-Tiny-v0", set=("method",)), "not key=value"),
        (Args("DRRL-Tiny-v0", set=("method=pca",)), "not registered"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        configs(args)


def test_two_workers_build_what_one_process_builds(tmp_path):
    one = Args("DRRL-Tiny-v0", max_windows=3, cache_dir=str(tmp_path / "one"))
    two = Args("DRRL-Tiny-v0", max_windows=3, workers=2, threads=1, cache_dir=str(tmp_path / "two"))
    main(one)
    command = [sys.executable, "-m", "drrl_env.build_cache", "DRRL-Tiny-v0", "--max-windows", "3"]
    command += ["--workers", "2", "--threads", "1", "--cache-dir", two.cache_dir]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (a,), (b,) = configs(one), configs(two)
    stores = RolloutCache(a).store, RolloutCache(b).store
    for window in range(3):
        first, second = (store.read_shard(window) for store in stores)
        for name in first:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_ray_executor_builds_the_same_shards(tmp_path):
    pytest.importorskip("ray")
    local = Args("DRRL-Tiny-v0", max_windows=2, cache_dir=str(tmp_path / "local"))
    ray_args = Args("DRRL-Tiny-v0", max_windows=2, executor="ray", cache_dir=str(tmp_path / "r"))
    main(local)
    report = main(ray_args)
    assert report["train"]["built"] == 2
    (a,), (b,) = configs(local), configs(ray_args)
    for window in range(2):
        first = RolloutCache(a).store.read_shard(window)
        second = RolloutCache(b).store.read_shard(window)
        for name in first:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)

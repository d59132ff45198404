"""Rollout caches are a fixed function of the code's measurements: the refactors change none.

``tests/data/golden_cache.npz`` holds every array of two small caches (the calibrated and the
``topp`` tiny ids, two train windows each), written by this module's ``__main__``. A test
builds them again and compares array by array: integer arrays, action grids and FLOPs counts
exactly; the measured floats within float32 rounding, because another CPU may sum a matrix
product in another order (on the machine that wrote the file they agree bit for bit).

Regenerate the file only on purpose (a new ``CACHE_FORMAT`` or a changed measurement)::

    python tests/test_cache_golden.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).parent / "data" / "golden_cache.npz"
IDS = ("DRRL-Tiny-v0", "DRRL-Tiny-TopP-v0")
WINDOWS = 2
EXACT = ("tokens", "shape", "actions", "costs", "flops_full", "split_windows", "flops", "kept")
"""Arrays that are counts, grids or ids: equal bit for bit on every machine."""


def cache_arrays(cache_dir: str) -> dict[str, np.ndarray]:
    """Every array of the golden ids' train caches, built under ``cache_dir``."""
    import drrl_env
    from drrl_env.build_cache import Args, configs, main
    from drrl_env.envs.backends.cached import RolloutCache

    del drrl_env
    arrays: dict[str, np.ndarray] = {}
    for env_id in IDS:
        args = Args(env_id, max_windows=WINDOWS, cache_dir=cache_dir, threads=1)
        main(args)
        (config,) = configs(args)
        store = RolloutCache(config).store
        for name, array in store.read_shared(mmap=False).items():
            arrays[f"{env_id}/shared/{name}"] = np.array(array)
        for window in range(WINDOWS):
            for name, array in store.read_shard(window, mmap=False).items():
                arrays[f"{env_id}/{window}/{name}"] = np.array(array)
    return arrays


def test_a_cache_built_now_equals_the_golden_one(tmp_path):
    golden = dict(np.load(GOLDEN))
    built = cache_arrays(str(tmp_path))
    assert sorted(built) == sorted(golden)
    for key, expected in golden.items():
        actual = built[key]
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, key
        if key.rsplit("/", 1)[1] in EXACT:
            np.testing.assert_array_equal(actual, expected, err_msg=key)
        else:
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=key)


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        found = cache_arrays(folder)
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **found)
    print(f"wrote {len(found)} arrays to {GOLDEN}")

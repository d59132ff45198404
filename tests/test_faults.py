"""Damaged rollout caches: each fault is a clear error or a rebuilt window, never a wrong number.

One tiny cache (two windows of 256 tokens) is built once per module; each test damages a copy
of it the way a user (or a disk, or a buggy builder) could, then opens the environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import tyro

import drrl_env  # noqa: F401 (registers the ids)
from drrl_env.build_cache import Args, main
from drrl_env.store import MANIFEST, CorruptShardError, CorruptShardWarning, _digest, _host

KWARGS = {"max_windows": 2, "seq_len": 256}
WINDOWS = (0, 1)


def _make(cache: Path, **extra) -> gym.Env:
    return gym.make("DRRL-Tiny-v0", cache_dir=str(cache), **KWARGS, **extra).unwrapped


def _rewards(env: gym.Env, window: int) -> np.ndarray:
    """The reward of every action at every step of ``window`` (steps, A), exact actions taken."""
    env.reset(options={"window": window})
    rows, terminated = [], False
    while not terminated:
        rows.append(env.candidate_values()["reward"])
        *_, terminated, _, _ = env.step(env.actions.full_action)
    return np.array(rows)


def _store_folder(cache: Path) -> Path:
    (folder,) = (cache / "rollouts").iterdir()
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An intact cache, its arrays and the rewards it gives under both fidelity terms."""
    cache = tmp_path_factory.mktemp("faults") / "cache"
    rewards = {}
    for fidelity in ("cosine", "loss"):
        env = _make(cache, fidelity=fidelity)
        rewards[fidelity] = {window: _rewards(env, window) for window in WINDOWS}
    store = env.backend.cache.store
    arrays = {window: store.read_shard(window, mmap=False) for window in WINDOWS}
    return {"cache": cache, "rewards": rewards, "arrays": arrays}


@pytest.fixture
def damaged(reference, tmp_path):
    """A fresh copy of the intact cache: (cache root, its rollout store folder)."""
    cache = tmp_path / "cache"
    shutil.copytree(reference["cache"], cache)
    return cache, _store_folder(cache)


def _assert_intact(env: gym.Env, reference: dict, fidelity: str = "cosine") -> None:
    """The environment gives the reference rewards and arrays for every window."""
    for window in WINDOWS:
        np.testing.assert_array_equal(_rewards(env, window), reference["rewards"][fidelity][window])
        shard = env.backend.cache.shard(window)
        for name, expected in reference["arrays"][window].items():
            np.testing.assert_array_equal(shard[name], expected, err_msg=name)


# -- how a file is damaged ---------------------------------------------------------------------


def _edit(path: Path, change) -> None:
    """Rewrite the .npy at ``path`` with ``change(array)`` (np.save: the manifest is stale)."""
    array = np.load(path)
    path.unlink()
    np.save(path, change(array))


def _set(index, value):
    def change(array):
        array = array.copy()
        array[index] = value
        return array

    return change


def _flip_bit(path: Path) -> None:
    """Flip the bit worth 0.25 of a cosine in [0.75, 1) (0.9939 -> 0.7439): still in range."""
    data = bytearray(path.read_bytes())
    values = np.load(path)
    flat = np.flatnonzero((values >= 0.75) & (values < 1.0))
    offset = len(data) - values.nbytes + int(flat[0]) * 8
    data[offset + 6] ^= 0x08  # bit 51 of the little-endian float64: the first mantissa bit
    path.write_bytes(bytes(data))
    changed = np.load(path).flat[flat[0]]
    assert abs(values.flat[flat[0]] - changed - 0.25) < 1e-12 and -1 <= changed <= 1


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:40] = b"{'descr': <<<<<( garbage )))))"[:30]
    path.write_bytes(bytes(data))


def _reseal(folder: Path) -> None:
    """Rewrite the manifest from the files as they are now (a builder that wrote bad numbers)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, entry in manifest["arrays"].items():
        array = np.load(folder / f"{name}.npy")
        entry.update(dtype=array.dtype.str, shape=list(array.shape), checksum=_digest(array))
    (folder / MANIFEST).write_text(json.dumps(manifest))


# -- a damaged window is rebuilt, with a warning naming it and the array -----------------------


SHARD_FAULTS = {
    "nan": ("cosine", lambda p: _edit(p, _set((0, 1, 2), np.nan)), "checksum"),
    "inf": ("cosine", lambda p: _edit(p, _set((1, 3, 0), np.inf)), "checksum"),
    "out_of_range": ("cosine", lambda p: _edit(p, _set((0, 0, 0), 5.0)), "checksum"),
    "flipped_bit": ("cosine", _flip_bit, "checksum"),
    "wrong_dtype": ("cosine", lambda p: _edit(p, lambda a: a.astype(np.int8)), "dtype int8"),
    "mean_nll_nan": ("mean_nll", lambda p: _edit(p, lambda a: np.array(np.nan)), "checksum"),
    "truncated": ("cosine", _truncate, "cannot be read"),
    "zero_bytes": ("spectra", lambda p: p.write_bytes(b""), "cannot be read"),
    "garbage_header": ("input_stats", _garbage_header, "cannot be read"),
    "missing_array": ("cosine", lambda p: p.unlink(), "is missing"),
    "wrong_shape": ("spectra", lambda p: _edit(p, lambda a: a[:, :2]), "has shape"),
}


@pytest.mark.parametrize("fault", sorted(SHARD_FAULTS))
def test_damaged_window_is_rebuilt(damaged, reference, fault):
    cache, folder = damaged
    array, damage, reason = SHARD_FAULTS[fault]
    damage(folder / "shards" / "00000001" / f"{array}.npy")
    pattern = rf"window 1 of .* is corrupt: array '{array}' .*{reason}.*rebuilding"
    with pytest.warns(CorruptShardWarning, match=pattern):
        env = _make(cache)
    _assert_intact(env, reference)


def test_nan_in_a_loss_term_is_rebuilt_for_the_loss_reward(damaged, reference):
    cache, folder = damaged
    _edit(folder / "shards" / "00000000" / "dnll_taylor.npy", _set((1, 2, 3), np.nan))
    with pytest.warns(CorruptShardWarning, match="window 0 .* array 'dnll_taylor'"):
        env = _make(cache, fidelity="loss")
    _assert_intact(env, reference, fidelity="loss")


def test_missing_manifest_means_unverifiable_and_rebuilt(damaged, reference):
    cache, folder = damaged
    (folder / "shards" / "00000001" / MANIFEST).unlink()
    with pytest.warns(CorruptShardWarning, match=f"window 1 .* has no {MANIFEST}"):
        env = _make(cache)
    _assert_intact(env, reference)


def test_edited_manifest_is_rebuilt(damaged, reference):
    cache, folder = damaged
    path = folder / "shards" / "00000001" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["arrays"]["spectra"]["shape"][1] = 3
    path.write_text(json.dumps(manifest))
    with pytest.warns(CorruptShardWarning, match="array 'spectra' has shape .* manifest records"):
        env = _make(cache)
    _assert_intact(env, reference)


def test_array_of_another_window_is_caught_by_its_checksum(damaged, reference):
    cache, folder = damaged
    shards = folder / "shards"
    shutil.copyfile(shards / "00000000" / "cosine.npy", shards / "00000001" / "cosine.npy")
    with pytest.warns(CorruptShardWarning, match="window 1 .* array 'cosine' fails its checksum"):
        env = _make(cache)
    _assert_intact(env, reference)


def test_stray_partial_entries_are_ignored_or_removed(damaged, reference, recwarn):
    cache, folder = damaged
    dead = int(subprocess.check_output([sys.executable, "-c", "import os; print(os.getpid())"]))
    stray = folder / "shards" / f".partial-{dead}-0a1b@{_host()}"
    stray.mkdir()
    (stray / "cosine.npy").write_bytes(b"half a file")
    (folder / "shards" / "00000001" / "cosine.npy.tmp").write_bytes(b"left by an editor")
    env = _make(cache)
    _assert_intact(env, reference)
    assert not stray.exists()
    assert not [w for w in recwarn if issubclass(w.category, CorruptShardWarning)]


# A builder that wrote bad numbers with a matching manifest: the ranges catch them.
RESEALED_FAULTS = {
    "nan": ("cosine", _set((0, 1, 2), np.nan), "non-finite value (nan at [0, 1, 2])"),
    "inf": ("cosine", _set((1, 0, 4), np.inf), "non-finite value (inf at [1, 0, 4])"),
    "out_of_range": ("cosine", _set((0, 0, 0), 5.0), "> 1 value (5 at [0, 0, 0])"),
    "wrong_dtype": ("cosine", lambda a: a.astype(np.int8), "dtype int8, expected floats"),
    "negative_fisher": ("dnll_fisher", _set((0, 0, 0), -1.0), "< 0 value"),
    "spectrum_sum": ("spectra", _set((0, 0, 0), 7.0), "not summing to 1"),
    "wrong_shape": ("spectra", lambda a: a[:, :2], "has shape (2, 2, 64), expected (2, 4, ?)"),
    "mean_nll_nan": ("mean_nll", lambda a: np.array(np.nan), "non-finite value (nan)"),
    "tokens_negative": ("tokens", _set(3, -5), "< 0 value (-5 at [3])"),
}


@pytest.mark.parametrize("fault", sorted(RESEALED_FAULTS))
def test_values_out_of_their_spec_are_rebuilt(damaged, reference, fault):
    cache, folder = damaged
    array, change, reason = RESEALED_FAULTS[fault]
    window = folder / "shards" / "00000001"
    _edit(window / f"{array}.npy", change)
    _reseal(window)
    with pytest.warns(CorruptShardWarning, match=f"array '{array}' .*{re.escape(reason)}"):
        env = _make(cache)
    _assert_intact(env, reference)


def test_a_window_still_corrupt_after_its_rebuild_is_an_error(damaged, monkeypatch):
    import drrl_env.envs.backends.cached as cached

    cache, folder = damaged
    _edit(folder / "shards" / "00000001" / "cosine.npy", _set((0, 0, 0), np.nan))
    original = cached.window_builder

    def broken_builder(config, threads=None):
        build = original(config, threads)
        return lambda window: {**build(window), "cosine": np.full((2, 4, 8), np.nan)}

    monkeypatch.setattr(cached, "window_builder", broken_builder)
    with (
        pytest.warns(CorruptShardWarning),
        pytest.raises(CorruptShardError, match="window 1 .* again after it was rebuilt") as info,
    ):
        _make(cache)
    assert info.value.index == 1 and info.value.array == "cosine"
    assert "python -m drrl_env.build_cache DRRL-Tiny-v0 --rebuild" in str(info.value)


# -- damaged shared arrays: an error naming them, the array and the rebuild command ------------


def _negate(array):
    return -array


SHARED_FAULTS = {
    "costs_nan": ("costs", _set((0, 1), np.nan), False, "fails its checksum"),
    "costs_negated": ("costs", _negate, False, "fails its checksum"),
    "shape_two_layers": ("shape", _set(0, 2), False, "fails its checksum"),
    "split_windows_two": ("split_windows", lambda a: np.array(2), False, "fails its checksum"),
    "flops_full_zero": ("flops_full", np.zeros_like, False, "fails its checksum"),
    "costs_nan_resealed": ("costs", _set((0, 1), np.nan), True, "non-finite value"),
    "costs_negated_resealed": ("costs", _negate, True, "< 0 values"),
    "shape_two_layers_resealed": ("shape", _set(0, 2), True, "says 2 layers"),
    "split_windows_resealed": ("split_windows", lambda a: np.array(1), True, "says 1 windows"),
    "flops_full_zero_resealed": ("flops_full", np.zeros_like, True, "<= 0 values"),
}


@pytest.mark.parametrize("fault", sorted(SHARED_FAULTS))
def test_damaged_shared_arrays_are_refused_with_the_rebuild_command(damaged, fault):
    cache, folder = damaged
    array, change, reseal, reason = SHARED_FAULTS[fault]
    _edit(folder / "shared" / f"{array}.npy", change)
    if reseal:
        _reseal(folder / "shared")
    with pytest.raises(CorruptShardError, match=re.escape(reason)) as info:
        _make(cache)
    message = str(info.value)
    assert message.startswith("the shared arrays are corrupt") and f"array '{array}'" in message
    assert info.value.index is None and info.value.array == array
    command = "python -m drrl_env.build_cache DRRL-Tiny-v0 --rebuild --splits train "
    assert command + f"--max-windows 2 --set seq_len=256 --cache-dir {cache}" in message


def test_missing_shared_manifest_is_refused(damaged):
    cache, folder = damaged
    (folder / "shared" / MANIFEST).unlink()
    with pytest.raises(
        CorruptShardError, match=f"shared arrays are corrupt: the folder has no {MANIFEST}"
    ):
        _make(cache)


def test_the_command_in_the_message_rebuilds_the_cache(damaged, reference):
    cache, folder = damaged
    _edit(folder / "shared" / "costs.npy", _negate)
    with pytest.raises(CorruptShardError) as info:
        _make(cache)
    command = re.search(r"`(python -m drrl_env\.build_cache [^`]+)`", str(info.value))[1]
    words = shlex.split(command)
    report = main(tyro.cli(Args, args=words[3:]))
    assert report["train"]["built"] == 2 and report["train"]["already_built"] == 0
    _assert_intact(_make(cache), reference)


def test_build_cache_verifies_every_window_and_repairs(damaged, reference):
    cache, folder = damaged
    _flip_bit(folder / "shards" / "00000000" / "cosine.npy")
    args = Args("DRRL-Tiny-v0", max_windows=2, set=("seq_len=256",), cache_dir=str(cache))
    with pytest.warns(CorruptShardWarning, match="window 0 .* array 'cosine' fails its checksum"):
        report = main(args)["train"]
    assert (report["built"], report["already_built"], report["repaired"]) == (0, 2, 1)
    _assert_intact(_make(cache), reference)


# -- builds: reports of concurrent builders, nothing left by a refused config ------------------


def test_concurrent_builds_report_what_each_built(reference, tmp_path):
    cache = tmp_path / "cache"
    for reused in ("bases", "windows"):  # calibration and tokenisation, not what is tested
        shutil.copytree(reference["cache"] / reused, cache / reused)
    command = [sys.executable, "-m", "drrl_env.build_cache", "DRRL-Tiny-v0", "--max-windows", "8"]
    command += ["--set", "seq_len=256", "--threads", "1", "--cache-dir", str(cache)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
        reports.append(json.loads(out.decode().strip().splitlines()[-1])["train"])
    assert sum(report["built"] for report in reports) == 8
    for report in reports:
        assert report["windows"] == 8
        assert report["built"] + report["already_built"] + report["built_by_others"] == 8
    assert sorted(int(p.name) for p in (_store_folder(cache) / "shards").iterdir()) == [*range(8)]


@pytest.mark.parametrize("bad", [{"ranks": [8, 128]}, {"seq_len": 10**9}])
def test_refused_config_leaves_no_folder(tmp_path, bad):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="ranks=|seq_len="):
        gym.make("DRRL-Tiny-v0", cache_dir=str(cache), **{**KWARGS, **bad})
    assert not (cache / "rollouts").exists()

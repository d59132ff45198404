"""ShardStore: atomic shards, resumable builds, claims between processes, stale cleanup,
verified reads (manifests, checksums, specs)."""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

import drrl_env.store as store_module
from drrl_env.store import (
    MANIFEST,
    ArraySpec,
    CorruptShardError,
    ShardStore,
    StoreKeyError,
    StoreNotWritableError,
)
from drrl_env.store_workers import build_in_workers

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

KEY = {"model": "tiny-llama", "corpus": "wikitext", "ranks": [2, 4, 8], "format": 1}
NAME = "org/tiny-llama"


def _arrays(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {
        "fidelity": rng.random((2, 3, 4)),
        "tokens": np.arange(5, dtype=np.int64) + index,
        "nll": np.float32(index + 0.5),
        "mask": rng.random(3) > 0.5,
    }


def _store(root: Path, key: dict = KEY) -> ShardStore:
    return ShardStore(root / "cache", key, NAME)


def _leftovers(store: ShardStore) -> list[Path]:
    """Partial entries and lock files anywhere in the store."""
    return [
        path
        for path in store.folder.rglob("*")
        if path.name.startswith(".partial-") or path.suffix == ".lock"
    ]


def _assert_same(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert left[name].shape == right[name].shape, name
        np.testing.assert_array_equal(left[name], right[name])


def _record_and_build(markers: Path, delay: float, index: int) -> dict[str, np.ndarray]:
    (markers / f"{index}.{os.getpid()}.{uuid.uuid4().hex}").touch()
    time.sleep(delay)
    return _arrays(index)


def _recording_build_fn(markers: str, delay: float) -> Callable[[int], dict[str, np.ndarray]]:
    """A build function leaving one marker file per call (index and pid in its name)."""
    return functools.partial(_record_and_build, Path(markers), delay)


def _calls(markers: Path) -> Counter[int]:
    return Counter(int(path.name.split(".")[0]) for path in markers.iterdir())


def _build_after_barrier(root: str, markers: str, indices: list[int], barrier: Barrier) -> None:
    store = ShardStore(root, KEY, NAME)
    barrier.wait(timeout=120)
    store.build(indices, _recording_build_fn(markers, 0.15), progress=False)


def _stall_from_two(markers: Path, index: int) -> dict[str, np.ndarray]:
    return _record_and_build(markers, 0.0 if index < 2 else 60.0, index)


def _build_until_stalled(root: str, markers: str, indices: list[int]) -> None:
    build_fn = functools.partial(_stall_from_two, Path(markers))
    ShardStore(root, KEY, NAME).build(indices, build_fn, progress=False)


def _failing_build_fn(bad_index: int) -> Callable[[int], dict[str, np.ndarray]]:
    return functools.partial(_fail_at, bad_index)


def _fail_at(bad_index: int, index: int) -> dict[str, np.ndarray]:
    if index == bad_index:
        raise ValueError(f"cannot build window {index}")
    return _arrays(index)


def test_round_trip_memory_maps_read_only_arrays(tmp_path):
    store = _store(tmp_path)
    assert store.folder.name.startswith("org_tiny-llama-") and not store.folder.exists()
    for index in (0, 1, 5):
        assert store.write_shard(index, _arrays(index))
    assert store.write_shared({"ranks": np.array([2, 4, 8], dtype=np.int64), "weights": np.eye(3)})
    assert json.loads((store.folder / "key.json").read_text()) == KEY

    reopened = _store(tmp_path)
    assert reopened.indices() == [0, 1, 5]
    assert reopened.has_shard(5) and not reopened.has_shard(2)
    assert reopened.missing([5, 4, 3, 2, 1, 0, 4]) == [4, 3, 2]
    for index in (0, 1, 5):
        mapped = reopened.read_shard(index)
        _assert_same(mapped, _arrays(index))
        for array in mapped.values():
            assert isinstance(array, np.memmap) and not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            mapped["fidelity"][0, 0, 0] = 1.0
        loaded = reopened.read_shard(index, mmap=False)
        _assert_same(loaded, _arrays(index))
        assert not any(isinstance(array, np.memmap) for array in loaded.values())
    shared = reopened.read_shared()
    assert isinstance(shared["ranks"], np.memmap) and shared["ranks"].dtype == np.int64
    np.testing.assert_array_equal(shared["weights"], np.eye(3))
    assert reopened.nbytes() > sum(a.nbytes for a in _arrays(0).values())
    assert _leftovers(reopened) == []


def test_shards_are_immutable_and_shared_arrays_first_writer_wins(tmp_path):
    store = _store(tmp_path)
    assert store.write_shard(3, _arrays(3))
    assert not store.write_shard(3, _arrays(4))
    _assert_same(store.read_shard(3), _arrays(3))
    assert store.remove_shard(3) and not store.has_shard(3) and not store.remove_shard(3)
    assert store.write_shard(3, _arrays(4))
    _assert_same(store.read_shard(3), _arrays(4))

    assert store.write_shared({"ranks": np.arange(3)})
    assert not store.write_shared({"ranks": np.arange(5)})
    assert len(store.read_shared()["ranks"]) == 3
    assert store.write_shared({"ranks": np.arange(5)}, overwrite=True)
    assert len(store.read_shared()["ranks"]) == 5
    assert _leftovers(store) == []
    with pytest.raises(FileNotFoundError, match="shard 9"):
        store.read_shard(9)
    with pytest.raises(FileNotFoundError, match="shared arrays"):
        _store(tmp_path, {**KEY, "model": "other"}).read_shared()


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        ({}, ValueError, "empty"),
        ({"../escape": np.zeros(2)}, ValueError, "file name"),
        ({"objects": np.array([{}, []], dtype=object)}, TypeError, "dtype object"),
        ([np.zeros(2)], TypeError, "dict of arrays"),
    ],
)
def test_write_shard_rejects_bad_arrays(tmp_path, arrays, error, message):
    store = _store(tmp_path)
    with pytest.raises(error, match=message):
        store.write_shard(0, arrays)
    assert store.indices() == []


@pytest.mark.parametrize(
    ("indices", "error"),
    [([0, -1], ValueError), ([0, 1.5], TypeError), ("012", TypeError), ([True], TypeError)],
)
def test_build_validates_indices(tmp_path, indices, error):
    calls = []
    with pytest.raises(error, match="indices"):
        _store(tmp_path).build(indices, lambda i: calls.append(i) or _arrays(i), progress=False)
    assert calls == []


def test_interrupted_build_keeps_finished_shards_and_resumes(tmp_path):
    calls: list[int] = []

    def interrupted(index: int) -> dict[str, np.ndarray]:
        calls.append(index)
        if index == 3:
            raise KeyboardInterrupt
        return _arrays(index)

    store = _store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.build(range(6), interrupted, progress=False)
    assert calls == [0, 1, 2, 3]
    assert store.indices() == [0, 1, 2]
    assert _leftovers(store) == []

    calls.clear()
    resumed = _store(tmp_path)
    built = resumed.build(range(6), lambda i: calls.append(i) or _arrays(i), progress=False)
    assert calls == built == [3, 4, 5]

    reference = ShardStore(tmp_path / "reference", KEY, NAME)
    assert reference.build(range(6), _arrays, progress=False) == list(range(6))
    for index in range(6):
        _assert_same(resumed.read_shard(index), reference.read_shard(index))


def test_interrupt_while_writing_leaves_no_partial_folder(tmp_path, monkeypatch):
    saved = []

    def interrupted_save(path: Path, array: np.ndarray) -> None:
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        np.save(path, array)

    store = _store(tmp_path)
    store.write_shard(0, _arrays(0))
    monkeypatch.setattr(store_module, "_save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        store.build(range(3), _arrays, progress=False)
    assert saved and saved[0].parent.name.startswith(".partial-")
    assert not saved[0].parent.exists()
    assert store.indices() == [0]
    assert _leftovers(store) == []


def test_extending_a_cache_builds_only_the_new_shards(tmp_path, capsys):
    store = _store(tmp_path)
    assert store.build(range(2), _arrays, progress=False) == [0, 1]
    first = {i: store.read_shard(i, mmap=False) for i in range(2)}
    stamps = [(store.folder / "shards" / f"{i:08d}").stat().st_ino for i in range(2)]

    calls = []
    built = _store(tmp_path).build(range(4), lambda i: calls.append(i) or _arrays(i), desc="wiki")
    assert calls == built == [2, 3]
    progress = capsys.readouterr().err
    assert "wiki:" in progress and "2/4" in progress and "4/4" in progress
    assert [(store.folder / "shards" / f"{i:08d}").stat().st_ino for i in range(2)] == stamps
    for index in range(2):
        _assert_same(store.read_shard(index), first[index])
    assert store.build(range(4), lambda i: calls.append(i) or _arrays(i), progress=False) == []
    assert calls == [2, 3]


@pytest.mark.parametrize("holder_writes", [True, False])
def test_build_waits_for_a_shard_claimed_elsewhere(tmp_path, holder_writes):
    """A busy shard is built last: by its holder, or here when the holder quits without it."""
    store, holder = _store(tmp_path), _store(tmp_path)
    holder.check_writable()
    claimed, calls = threading.Event(), []

    def hold_shard_two() -> None:
        with holder.claim(2) as mine:
            assert mine
            claimed.set()
            time.sleep(0.5)
            if holder_writes:
                holder.write_shard(2, _arrays(2))

    thread = threading.Thread(target=hold_shard_two)
    thread.start()
    assert claimed.wait(timeout=10)
    built = store.build(range(4), lambda i: calls.append(i) or _arrays(i), progress=False)
    thread.join()
    assert calls == built == ([0, 1, 3] if holder_writes else [0, 1, 3, 2])
    assert store.indices() == [0, 1, 2, 3]
    assert _leftovers(store) == []


def test_build_gives_up_after_wait_timeout(tmp_path):
    store, holder = _store(tmp_path), _store(tmp_path)
    with holder.claim(1) as mine:
        assert mine
        with pytest.raises(TimeoutError, match=r"shard 1 of .* another process after 0.3 s"):
            store.build(range(3), _arrays, progress=False, wait_timeout=0.3)
    assert store.indices() == [0, 2]


def test_claim_is_exclusive_and_false_once_the_shard_exists(tmp_path):
    store, other = _store(tmp_path), _store(tmp_path)
    with store.claim(4) as mine:
        with other.claim(4) as theirs:
            assert mine and not theirs
        assert (store.folder / "locks" / "00000004.lock").exists()
        store.write_shard(4, _arrays(4))
    assert not (store.folder / "locks" / "00000004.lock").exists()
    with other.claim(4) as theirs:
        assert not theirs


def test_killed_build_keeps_finished_shards_and_resumes(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    root = tmp_path / "cache"
    store = ShardStore(root, KEY, NAME)
    process = multiprocessing.get_context("spawn").Process(
        target=_build_until_stalled, args=(str(root), str(markers), list(range(8)))
    )
    process.start()
    deadline = time.monotonic() + 120
    while len(list(markers.iterdir())) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()  # SIGKILL while shard 2 is being built: no cleanup code runs
    process.join()
    assert store.indices() == [0, 1]
    assert _leftovers(store), "the killed build should leave its lock file of shard 2"

    resumed = ShardStore(root, KEY, NAME)
    assert _leftovers(store) == []
    calls = []
    built = resumed.build(range(8), lambda i: calls.append(i) or _arrays(i), progress=False)
    assert calls == built == [2, 3, 4, 5, 6, 7]


def test_two_processes_build_every_shard_exactly_once(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(
            target=_build_after_barrier, args=(str(root), str(markers), list(range(8)), barrier)
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert _calls(markers) == Counter(range(8))
    builders = {path.name.split(".")[1] for path in markers.iterdir()}
    assert builders == {str(process.pid) for process in processes}
    store = ShardStore(root, KEY, NAME)
    assert store.indices() == list(range(8))
    for index in range(8):
        _assert_same(store.read_shard(index), _arrays(index))
    assert _leftovers(store) == []


def test_build_in_workers_splits_the_shards(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    store = _store(tmp_path)
    store.write_shard(0, _arrays(0))
    built = build_in_workers(
        store, range(7), _recording_build_fn, (str(markers), 0.1), workers=2, progress=False
    )
    assert built == [1, 2, 3, 4, 5, 6]
    assert _calls(markers) == Counter(range(1, 7))
    assert store.indices() == list(range(7))
    for index in range(7):
        _assert_same(store.read_shard(index), _arrays(index))
    assert _leftovers(store) == []


def test_build_in_workers_raises_the_worker_error(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(ValueError, match="cannot build window 2") as info:
        build_in_workers(store, range(4), _failing_build_fn, (2,), workers=2, progress=False)
    assert any("in build worker" in note for note in getattr(info.value, "__notes__", []))
    assert not store.has_shard(2)
    assert _leftovers(store) == []
    with pytest.raises(ValueError, match="workers"):
        build_in_workers(store, range(4), _failing_build_fn, (9,), workers=0)


def test_read_only_folder_fails_before_building(tmp_path, monkeypatch):
    store, calls = _store(tmp_path), []
    if os.geteuid() == 0:  # root ignores permission bits: fail the probe write instead

        def refuse(path: Path) -> None:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(ShardStore, "_write_probe", staticmethod(refuse))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o555)
    try:
        with pytest.raises(StoreNotWritableError, match=re.escape(str(store.folder))) as info:
            store.build(range(3), lambda i: calls.append(i) or _arrays(i), progress=False)
    finally:
        (tmp_path / "cache").chmod(0o755)
    assert isinstance(info.value, PermissionError)
    assert "not writable" in str(info.value)
    assert calls == []


def test_opening_removes_partial_entries_of_dead_writers_only(tmp_path):
    store = _store(tmp_path)
    store.check_writable()
    dead_pid = int(subprocess.check_output([sys.executable, "-c", "import os; print(os.getpid())"]))
    host = store_module._host()
    dead_partial = store.folder / f".partial-{dead_pid}-0a1b@{host}"
    dead_partial.mkdir()
    (dead_partial / "fidelity.npy").write_bytes(b"half a file")
    dead_key = store.folder / f".partial-{dead_pid}-2c3d@{host}"
    dead_key.write_text("{")
    live_partial = store.folder / f".partial-{os.getpid()}-4e5f@{host}"
    live_partial.mkdir()
    parent_partial = store.folder / "shards" / f".partial-{os.getppid()}-6a7b@{host}"
    parent_partial.write_text("probe")
    old_foreign = store.folder / ".partial-12-8c9d@another-host"
    old_foreign.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_foreign, (two_days_ago, two_days_ago))
    young_foreign = store.folder / ".partial-12-0e1f@another-host"
    young_foreign.mkdir()
    abandoned_lock = store.folder / "locks" / "00000007.lock"
    abandoned_lock.touch()

    with store.claim(5) as mine:
        assert mine
        reopened = _store(tmp_path)
        assert (store.folder / "locks" / "00000005.lock").exists()
    assert not dead_partial.exists() and not dead_key.exists()
    assert not old_foreign.exists() and not abandoned_lock.exists()
    assert live_partial.exists() and parent_partial.exists() and young_foreign.exists()
    assert reopened.indices() == []


def test_key_mismatch_is_an_error_naming_the_folder(tmp_path):
    store = _store(tmp_path)
    store.write_shard(0, _arrays(0))
    other = _store(tmp_path, {**KEY, "ranks": [2, 4]})
    assert other.folder != store.folder and other.indices() == []

    key_file = store.folder / "key.json"
    key_file.write_text(json.dumps({**KEY, "corpus": "c4"}))
    with pytest.raises(StoreKeyError, match=re.escape(str(store.folder))):
        _store(tmp_path)
    key_file.write_text('{"model": ')
    with pytest.raises(StoreKeyError, match="corrupt"):
        _store(tmp_path)
    assert store.has_shard(0)
    with pytest.raises(TypeError, match="JSON"):
        _store(tmp_path, {"model": object()})


# -- verification: manifests, checksums, specs ----------------------------------------------


SPEC = {
    "fidelity": ArraySpec("f", (2, 3, 4), low=0.0, high=1.0),
    "tokens": ArraySpec("iu", (5,), low=0),
    "nll": ArraySpec("f", (), low=0.0),
    "mask": ArraySpec("b", (3,)),
    "extra": ArraySpec("f", optional=True),
}


def _fidelity_path(store: ShardStore, index: int) -> Path:
    return store.folder / "shards" / f"{index:08d}" / "fidelity.npy"


def test_manifest_records_dtype_shape_and_checksum(tmp_path):
    store = _store(tmp_path)
    store.write_shard(0, _arrays(0))
    store.write_shared({"ranks": np.arange(3)})
    for folder in (store.folder / "shards" / "00000000", store.folder / "shared"):
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["format"] == 1 and manifest["checksum"] == "blake2b-128"
        for name, entry in manifest["arrays"].items():
            array = np.load(folder / f"{name}.npy")
            assert entry["dtype"] == array.dtype.str and entry["shape"] == list(array.shape)
            expected = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16)
            assert entry["checksum"] == expected.hexdigest()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _resave(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        array = change(np.load(path))
        path.unlink()
        np.save(path, array)

    return damage


def _edit_manifest(path: Path) -> None:
    manifest_path = path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["arrays"]["fidelity"]["dtype"] = "<f4"
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "array", "reason"),
    [
        (_flip_byte, "fidelity", "fails its checksum"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "fidelity", "cannot be read"),
        (lambda p: p.write_bytes(b""), "fidelity", r"cannot be read \(EOFError"),
        (
            lambda p: p.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': <<<" + b" " * 120),
            "fidelity",
            "cannot be read",
        ),
        (lambda p: p.unlink(), "fidelity", r"is missing \(its manifest lists it\)"),
        (_resave(lambda a: a.astype(np.int8)), "fidelity", "has dtype int8, its manifest records"),
        (_resave(lambda a: a[:1]), "fidelity", r"has shape \(1, 3, 4\), its manifest records"),
        (_edit_manifest, "fidelity", "has dtype float64, its manifest records float32"),
        (lambda p: (p.parent / MANIFEST).unlink(), None, f"has no {MANIFEST}"),
        (lambda p: (p.parent / MANIFEST).write_text("{"), None, f"unreadable {MANIFEST}"),
    ],
)
def test_a_damaged_shard_names_the_shard_the_array_and_the_fix(tmp_path, damage, array, reason):
    store = _store(tmp_path)
    store.write_shard(3, _arrays(3))
    damage(_fidelity_path(store, 3))
    with pytest.raises(CorruptShardError, match=reason) as info:
        _store(tmp_path).read_shard(3)
    error = info.value
    assert (error.index, error.array) == (3, array) and isinstance(error, ValueError)
    subject = f"array '{array}'" if array else "the folder"
    assert str(error).startswith(f"shard 3 is corrupt: {subject} ")
    assert f"Fix: delete {store.folder / 'shards' / '00000003'}" in str(error)
    with pytest.raises(CorruptShardError) as again:
        pickle.loads(pickle.dumps(error))  # crosses process boundaries intact
        raise pickle.loads(pickle.dumps(error))
    assert (again.value.index, again.value.array, str(again.value)) == (3, array, str(error))


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (
            "fidelity",
            np.full((2, 3, 4), np.nan),
            r"holds 24 non-finite values \(nan at \[0, 0, 0\]\)",
        ),
        ("fidelity", np.full((2, 3, 4), 1.5), r"holds 24 > 1 values \(1.5 at \[0, 0, 0\]\)"),
        ("fidelity", np.zeros((2, 3, 5)), r"has shape \(2, 3, 5\), expected \(2, 3, 4\)"),
        ("tokens", np.arange(5.0), "has dtype float64, expected signed integers or unsigned"),
        ("tokens", np.arange(5) - 1, r"holds 1 < 0 value \(-1 at \[0\]\)"),
        ("nll", np.float64(np.inf), r"holds 1 non-finite value \(inf\)"),
        ("mask", None, "is missing"),
    ],
)
def test_spec_checks_kind_shape_finiteness_and_range(tmp_path, name, value, reason):
    arrays = _arrays(0)
    if value is None:
        del arrays[name]
    else:
        arrays[name] = value
    store = ShardStore(tmp_path, KEY, NAME, shard_spec=SPEC, unit="window", hint="run the fix")
    store.write_shard(0, arrays)
    with pytest.raises(CorruptShardError, match=f"window 0 is corrupt: array '{name}' {reason}"):
        store.read_shard(0)
    assert str(pytest.raises(CorruptShardError, store.read_shard, 0).value).endswith(
        "Fix: run the fix"
    )
    store.write_shard(1, _arrays(1))
    store.read_shard(1)  # the intact shard passes, and ``extra`` is optional


def test_spectra_rows_must_sum_to_one(tmp_path):
    spec = {"spectra": ArraySpec("f", (None, 4), low=0.0, row_sum=1.0)}
    store = ShardStore(tmp_path, KEY, NAME, shard_spec=spec)
    store.write_shard(0, {"spectra": np.full((3, 4), 0.25)})
    store.write_shard(1, {"spectra": np.array([[0.25] * 4, [0.5, 0.5, 0.5, 0.0]])})
    store.read_shard(0)
    with pytest.raises(CorruptShardError, match=r"1 row not summing to 1 \(sum 1.5 at \[1\]\)"):
        store.read_shard(1)


def test_shared_arrays_are_verified_too(tmp_path):
    spec = {"costs": ArraySpec("f", (None,), low=0.0)}
    store = ShardStore(tmp_path, KEY, NAME, shared_spec=spec)
    store.write_shared({"costs": -np.ones(3)})
    with pytest.raises(
        CorruptShardError, match="the shared arrays are corrupt: array 'costs'"
    ) as info:
        store.read_shared()
    assert info.value.index is None and "Fix: delete" in str(info.value)


def test_a_shard_is_verified_once_per_store_and_again_when_its_files_change(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.write_shard(0, _arrays(0))
    digests = []
    original = store_module._digest
    monkeypatch.setattr(store_module, "_digest", lambda a: digests.append(1) or original(a))
    first = store.read_shard(0)
    assert len(digests) == 4
    again = store.read_shard(0)
    assert len(digests) == 4 and all(again[name] is first[name] for name in first)
    store.read_shard(0, mmap=False)
    assert len(digests) == 4
    _store(tmp_path).read_shard(0)  # another store instance checks for itself
    assert len(digests) == 8
    path = _fidelity_path(store, 0)
    _flip_byte(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    store_module._OPEN.drop((store._id, 0))  # as if evicted: the files are looked at again
    with pytest.raises(CorruptShardError, match="fails its checksum"):
        store.read_shard(0)


def test_the_table_of_open_shards_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_OPEN", store_module._OpenShards(windows=3, files=100))
    store = _store(tmp_path)
    for index in range(6):
        store.write_shard(index, _arrays(index))
    for index in range(6):
        _assert_same(store.read_shard(index), _arrays(index))
    assert len(store_module._OPEN.entries) == 3 and store_module._OPEN.open_files == 12
    tight = store_module._OpenShards(windows=100, files=9)
    monkeypatch.setattr(store_module, "_OPEN", tight)
    for index in range(6):
        store.read_shard(index)
    assert len(tight.entries) == 2 and tight.open_files == 8
    _assert_same(store.read_shard(0), _arrays(0))  # evicted, mapped again


def test_rebuild_shard_replaces_only_a_corrupt_shard(tmp_path):
    store = _store(tmp_path)
    store.write_shard(2, _arrays(2))
    assert not store.rebuild_shard(2, lambda i: pytest.fail("an intact shard was rebuilt"))
    _flip_byte(_fidelity_path(store, 2))
    reader = _store(tmp_path)
    with pytest.raises(CorruptShardError):
        reader.read_shard(2)
    assert reader.rebuild_shard(2, _arrays)
    _assert_same(reader.read_shard(2), _arrays(2))
    _assert_same(_store(tmp_path).read_shard(2), _arrays(2))
    assert _leftovers(store) == []


def test_discard_if_empty_removes_only_what_nobody_wrote(tmp_path):
    store = ShardStore(tmp_path / "a" / "b", KEY, NAME)
    store.check_writable()
    assert store.discard_if_empty()
    assert not (tmp_path / "a").exists()
    store.write_shard(0, _arrays(0))
    assert not store.discard_if_empty() and store.has_shard(0)
    assert store.remove_all() and not store.folder.exists() and not store.remove_all()
    assert store.write_shard(0, _arrays(0))  # the store can be built again
    _assert_same(store.read_shard(0), _arrays(0))

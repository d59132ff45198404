"""A resumable, shared, sharded array store: numbered shards of ``.npy`` files in one folder.

A :class:`ShardStore` knows nothing about models. It keeps, in one folder per key,

- numbered shards (one per text window), each a dict of numpy arrays,
- one dict of shared arrays (values common to every shard),
- ``key.json``, the JSON key the folder name is hashed from.

Layout of ``root / f"{slug(name)}-{sha256(key)[:16]}"``::

    key.json                    the key, checked on every open
    shards/00000003/fidelity.npy
    shared/ranks.npy
    locks/00000003.lock         only while a process builds shard 3
    .partial-<pid>-<token>@<host>   a shard or file being written

Every array is its own ``.npy`` file, so readers memory-map them (``.npz`` archives cannot be
mapped) and many environment copies in subprocesses share one copy in the page cache.

Writes are atomic (a ``.partial-*`` folder renamed into place) and shards immutable. A
per-shard :class:`filelock.FileLock` keeps two processes from building the same shard;
:meth:`ShardStore.build` is the resumable build loop, and
:func:`drrl_env.store_workers.build_in_workers` runs it in several spawned processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from numpy.typing import ArrayLike
from tqdm.auto import tqdm

BuildFn = Callable[[int], Mapping[str, ArrayLike]]
"""Computes the arrays of one shard from its index."""

STALE_AFTER = 24 * 3600.0
"""Seconds after which a partial file of another host counts as abandoned."""

_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PARTIAL = re.compile(r"\.partial-(?P<pid>\d+)-(?P<token>[0-9a-f]+)@(?P<host>.+)")
_LOCK_ATTEMPTS = 3  # retries when a lock file was unlinked by its previous holder
_WAIT_STEP = 1.0  # seconds a waiter blocks on a lock before it re-checks the shard


class StoreKeyError(ValueError):
    """A store folder's ``key.json`` is unreadable or records another key."""


class StoreNotWritableError(PermissionError):
    """A store folder cannot be written (read-only cache, wrong owner, full disk)."""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


def _host() -> str:
    return _slug(socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (zombies count as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _is_stale(path: Path, stale_after: float) -> bool:
    """Whether ``path`` is a partial file or folder its writer abandoned.

    On this host the writer's pid decides: a partial entry of a live process is never
    stale, one of a dead process always is. Entries of other hosts (a shared filesystem)
    are stale once older than ``stale_after`` seconds.
    """
    match = _PARTIAL.fullmatch(path.name)
    if match is None:
        return False
    if match["host"] == _host():
        return not _pid_alive(int(match["pid"]))
    try:
        return time.time() - path.lstat().st_mtime > stale_after
    except FileNotFoundError:
        return False


def _remove(path: Path) -> bool:
    """Delete a file or folder tree, tolerating a concurrent remover; True if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            path.unlink()
    return not path.exists()


def _check_index(index: Any, argument: str = "index") -> int:
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise TypeError(f"{argument} must be a non-negative int, got {index!r}")
    if index < 0:
        raise ValueError(f"{argument} must be non-negative, got {index}")
    return int(index)


def _check_indices(indices: Iterable[int]) -> list[int]:
    """``indices`` as a list of distinct non-negative ints, first occurrence order kept."""
    if isinstance(indices, str | bytes) or not isinstance(indices, Iterable):
        raise TypeError(f"indices must be an iterable of non-negative ints, got {indices!r}")
    checked = (_check_index(i, "every entry of indices") for i in indices)
    return list(dict.fromkeys(checked))


def _check_arrays(arrays: Mapping[str, ArrayLike], what: str) -> dict[str, np.ndarray]:
    """``arrays`` as numpy arrays, with names that are valid file names."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"the arrays of {what} must be a dict of arrays, got {type(arrays)}")
    if not arrays:
        raise ValueError(f"the arrays of {what} are empty: a shard needs at least one array")
    checked = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name):
            raise ValueError(
                f"array name {name!r} of {what} is not a plain file name (letters, digits, _.-)"
            )
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} of {what} has dtype object, which .npy cannot map")
        checked[name] = array
    return checked


def _save(path: Path, array: np.ndarray) -> None:
    """Write one ``.npy`` file and flush it to disk before it is renamed into place."""
    with open(path, "xb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _load_folder(folder: Path, mmap: bool, what: str) -> dict[str, np.ndarray]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} does not exist ({folder})")
    mode = "r" if mmap else None
    return {
        path.stem: np.load(path, mmap_mode=mode, allow_pickle=False)
        for path in sorted(folder.glob("*.npy"))
    }


def _lock_is_current(lock: FileLock, path: Path) -> bool:
    """Whether ``lock`` holds the file now at ``path``, not one its last holder unlinked."""
    descriptor = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    try:
        current = os.stat(path)
        return descriptor is None or os.path.samestat(os.fstat(descriptor), current)
    except FileNotFoundError:
        return False


def _acquire(path: Path, timeout: float) -> FileLock | None:
    """The lock of ``path`` held by this process, or None when busy past ``timeout`` s."""
    deadline = time.monotonic() + timeout
    for _ in range(_LOCK_ATTEMPTS):
        lock = FileLock(path, timeout=max(0.0, deadline - time.monotonic()))
        try:
            lock.acquire()
        except Timeout:
            return None
        if _lock_is_current(lock, path):
            return lock
        lock.release()  # the file was unlinked under us: retry on the one now at ``path``
    return None


class ShardStore:
    """Numbered shards of numpy arrays plus shared arrays, in a folder named by a key.

    Args:
        root: The folder holding stores (created on the first write, not on open).
        key: A JSON-serializable dict naming what the store holds; its SHA-256 names the
            folder and ``key.json`` records it.
        name: A readable prefix of the folder name (e.g. the model name).
        stale_after: Seconds after which partial files of another host count as abandoned.

    Raises:
        StoreKeyError: The folder exists and its ``key.json`` is unreadable or records a
            different key (a hash collision or a corrupt file). The store is not rebuilt:
            delete the folder named in the message to rebuild it.
        TypeError: ``key`` is not a JSON-serializable dict.
        ValueError: ``name`` has no character usable in a folder name.

    Opening an existing store checks its key and removes partial files of dead writers
    (when the folder is writable). Readers need no write permission.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        key: Mapping[str, Any],
        name: str,
        *,
        stale_after: float = STALE_AFTER,
    ) -> None:
        if not isinstance(key, Mapping):
            raise TypeError(f"key must be a dict, got {type(key)}")
        try:
            canonical = json.dumps(key, sort_keys=True)
        except TypeError as error:
            raise TypeError(f"key must be JSON-serializable: {error}") from error
        if not isinstance(name, str) or not _slug(name).strip("_"):
            raise ValueError(f"name must be a non-empty folder-friendly str, got {name!r}")
        self.name = name
        self.key: dict[str, Any] = json.loads(canonical)
        self.root = Path(root)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        self.folder = self.root / f"{_slug(name)}-{digest}"
        self._shards, self._locks = self.folder / "shards", self.folder / "locks"
        self._shared, self._key_file = self.folder / "shared", self.folder / "key.json"
        self.stale_after = stale_after
        self._ready = False
        if self.folder.is_dir():
            self._check_key()
            self.remove_stale()

    def __repr__(self) -> str:
        return f"ShardStore(name={self.name!r}, folder='{self.folder}')"

    # Layout.

    def _shard_path(self, index: int) -> Path:
        return self._shards / f"{index:08d}"

    def _lock_path(self, index: int) -> Path:
        return self._locks / f"{index:08d}.lock"

    def _partial_path(self) -> Path:
        token = uuid.uuid4().hex[:12]
        return self.folder / f".partial-{os.getpid()}-{token}@{_host()}"

    # Creation, key and permissions.

    def _check_key(self) -> bool:
        """True if ``key.json`` records this key, False if it is not written yet."""
        try:
            recorded = json.loads(self._key_file.read_text())
        except FileNotFoundError:
            return False
        except ValueError as error:
            raise StoreKeyError(
                f"{self._key_file} is corrupt ({error}); delete {self.folder} to rebuild it"
            ) from error
        if recorded != self.key:
            raise StoreKeyError(
                f"{self._key_file} records another key than the one it is named after "
                f"(hash collision or corruption); delete {self.folder} to rebuild it"
            )
        return True

    def _not_writable(self, error: OSError) -> StoreNotWritableError:
        reason = error.strerror or str(error)
        return StoreNotWritableError(
            f"cache folder {self.folder} is not writable ({reason}): fix its permissions or "
            "choose another cache folder"
        )

    def _prepare(self) -> None:
        """Create the folder and record the key, once per instance."""
        if self._ready:
            return
        try:
            for folder in (self.folder, self._shards, self._locks):
                folder.mkdir(parents=True, exist_ok=True)
            if not self._check_key():
                partial = self._partial_path()
                try:
                    partial.write_text(json.dumps(self.key, sort_keys=True, indent=2) + "\n")
                    os.replace(partial, self._key_file)
                finally:
                    _remove(partial)
        except OSError as error:
            raise self._not_writable(error) from error
        self._ready = True

    @staticmethod
    def _write_probe(path: Path) -> None:
        with open(path, "xb") as handle:
            handle.write(b"probe")

    def check_writable(self) -> None:
        """Create the store and write then delete a probe file in each of its folders.

        Raises:
            StoreNotWritableError: A ``PermissionError`` naming the folder, raised before
                anything is built.
        """
        self._prepare()
        for folder in (self.folder, self._shards, self._locks):
            probe = folder / self._partial_path().name
            try:
                self._write_probe(probe)
            except OSError as error:
                raise self._not_writable(error) from error
            finally:
                _remove(probe)

    def remove_stale(self) -> list[Path]:
        """Delete partial entries of dead writers and lock files nobody holds.

        Partial entries of live processes on this host are never touched. Failures to
        delete (a read-only folder) are ignored.

        Returns:
            The paths removed.
        """
        removed = []
        for folder in (self.folder, self._shards, self._locks):
            with contextlib.suppress(OSError):
                for entry in list(folder.iterdir()):
                    if _is_stale(entry, self.stale_after) and _remove(entry):
                        removed.append(entry)
        with contextlib.suppress(OSError):
            for path in sorted(self._locks.glob("*.lock")):
                lock = _acquire(path, timeout=0.0)
                if lock is not None:
                    try:
                        path.unlink()
                        removed.append(path)
                    finally:
                        lock.release()
        return removed

    # Reading.

    def indices(self) -> list[int]:
        """The indices of the shards present, sorted."""
        try:
            names = os.listdir(self._shards)
        except FileNotFoundError:
            return []
        return sorted(int(name) for name in names if name.isdigit())

    def has_shard(self, index: int) -> bool:
        """Whether shard ``index`` is complete on disk."""
        return self._shard_path(_check_index(index)).is_dir()

    def missing(self, indices: Iterable[int]) -> list[int]:
        """The entries of ``indices`` (duplicates dropped, order kept) with no shard yet."""
        wanted = _check_indices(indices)
        present = set(self.indices())
        return [index for index in wanted if index not in present]

    def read_shard(self, index: int, mmap: bool = True) -> dict[str, np.ndarray]:
        """The arrays of shard ``index``, read-only ``np.memmap`` views when ``mmap``.

        Raises:
            FileNotFoundError: The shard is not built.
        """
        index = _check_index(index)
        return _load_folder(self._shard_path(index), mmap, f"shard {index} of {self.folder}")

    def has_shared(self) -> bool:
        """Whether the shared arrays are written."""
        return self._shared.is_dir()

    def read_shared(self, mmap: bool = True) -> dict[str, np.ndarray]:
        """The shared arrays, read-only ``np.memmap`` views when ``mmap``.

        Raises:
            FileNotFoundError: No shared arrays were written.
        """
        return _load_folder(self._shared, mmap, f"the shared arrays of {self.folder}")

    def nbytes(self) -> int:
        """Bytes on disk of every shard and the shared arrays."""
        total = 0
        for folder in (self._shards, self._shared):
            for parent, _, files in os.walk(folder):
                for file in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(parent, file)).st_size
        return total

    # Writing.

    def _publish(self, arrays: dict[str, np.ndarray], target: Path) -> bool:
        """Write ``arrays`` into a partial folder, then rename it to ``target``."""
        staging = self._partial_path()
        try:
            staging.mkdir()
            for name, array in arrays.items():
                _save(staging / f"{name}.npy", array)
            try:
                os.rename(staging, target)
            except OSError:
                if target.is_dir():
                    return False  # another process published it first
                raise
            return True
        finally:
            _remove(staging)

    def write_shard(self, index: int, arrays: Mapping[str, ArrayLike]) -> bool:
        """Write shard ``index`` atomically.

        Returns:
            True if written, False if the shard already existed (it is kept unchanged:
            shards are immutable, see :meth:`remove_shard`).
        """
        index = _check_index(index)
        checked = _check_arrays(arrays, f"shard {index}")
        self._prepare()
        return self._publish(checked, self._shard_path(index))

    def remove_shard(self, index: int) -> bool:
        """Delete shard ``index`` (e.g. found corrupt); True if it existed."""
        shard = self._shard_path(_check_index(index))
        retired = self._partial_path()
        try:
            os.rename(shard, retired)
        except FileNotFoundError:
            return False
        _remove(retired)
        return True

    def write_shared(self, arrays: Mapping[str, ArrayLike], *, overwrite: bool = False) -> bool:
        """Write the shared arrays atomically.

        Args:
            arrays: The shared arrays.
            overwrite: Replace shared arrays already written. Readers that mapped the old
                files keep reading them; a reader opening during the swap may find none.

        Returns:
            True if written, False if shared arrays existed and ``overwrite`` is False (the
            first writer wins, as when concurrent builders compute the same values).
        """
        checked = _check_arrays(arrays, "the shared arrays")
        self._prepare()
        if not overwrite:
            return not self.has_shared() and self._publish(checked, self._shared)
        retired = self._partial_path()
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._shared, retired)
        try:
            return self._publish(checked, self._shared)
        finally:
            _remove(retired)

    # Building.

    @contextlib.contextmanager
    def claim(self, index: int, timeout: float = 0.0) -> Iterator[bool]:
        """Hold shard ``index``'s lock for the ``with`` block.

        Args:
            index: The shard.
            timeout: Seconds to wait for another holder; 0 tries once without blocking.

        Yields:
            True if this process holds the lock and the shard is still missing (it should
            build it), False if another process holds it or the shard exists. The lock
            file is deleted on exit, also on an exception.
        """
        index = _check_index(index)
        self._prepare()
        path = self._lock_path(index)
        lock = _acquire(path, timeout)
        if lock is None:
            yield False
            return
        try:
            yield not self.has_shard(index)
        finally:
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # while held, so no waiter locks a file about to vanish
            finally:
                lock.release()

    def _build_one(self, index: int, build_fn: BuildFn) -> None:
        self.write_shard(index, build_fn(index))

    def _await(self, index: int, build_fn: BuildFn, wait_timeout: float | None) -> bool:
        """Wait for another process to build shard ``index``; build it if that one quit.

        Returns:
            True if this process built the shard.

        Raises:
            TimeoutError: The shard is still being built after ``wait_timeout`` seconds.
        """
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        while not self.has_shard(index):
            step = _WAIT_STEP
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    raise TimeoutError(
                        f"shard {index} of {self.folder} is still being built by another "
                        f"process after {wait_timeout} s"
                    )
            with self.claim(index, timeout=step) as mine:
                if mine:
                    self._build_one(index, build_fn)
                    return True
        return False

    def build(
        self,
        indices: Iterable[int],
        build_fn: BuildFn,
        *,
        progress: bool = True,
        desc: str | None = None,
        wait_timeout: float | None = None,
    ) -> list[int]:
        """Build every missing shard of ``indices`` with ``build_fn``, resumably.

        Checks the folder is writable, then claims, builds, writes and releases each
        missing shard. Shards another process is building are waited for at the end (and
        built here if that process quit without them). An exception or
        ``KeyboardInterrupt`` in ``build_fn`` propagates at once, keeping every finished
        shard and leaving no partial folder or lock file: calling again resumes.

        Args:
            indices: The shards wanted (non-negative ints).
            build_fn: ``build_fn(index)`` returns the shard's arrays (a non-empty dict).
            progress: Show a progress bar over ``indices``, counting shards already present.
            desc: The progress bar's label.
            wait_timeout: Seconds to wait for each shard another process builds; None waits
                as long as that process lives.

        Returns:
            The indices this call built, in build order.

        Raises:
            StoreNotWritableError: The folder is not writable (before anything is built).
            TimeoutError: A shard of another process was not done within ``wait_timeout``.
        """
        wanted = _check_indices(indices)
        self.check_writable()
        self.remove_stale()
        todo = self.missing(wanted)
        built, deferred = [], []
        with tqdm(
            total=len(wanted),
            initial=len(wanted) - len(todo),
            desc=desc or f"building {self.name}",
            unit="shard",
            disable=not progress,
        ) as bar:
            for index in todo:
                with self.claim(index) as mine:
                    if mine:
                        self._build_one(index, build_fn)
                        built.append(index)
                if mine or self.has_shard(index):
                    bar.update(1)
                else:
                    deferred.append(index)
            for index in deferred:
                if self._await(index, build_fn, wait_timeout):
                    built.append(index)
                bar.update(1)
        return built

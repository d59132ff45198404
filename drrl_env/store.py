"""A resumable, shared, sharded array store: numbered shards of ``.npy`` files in one folder.

A :class:`ShardStore` knows nothing about models. It keeps, in one folder per key,

- numbered shards (one per text window), each a dict of numpy arrays,
- one dict of shared arrays (values common to every shard),
- ``key.json``, the JSON key the folder name is hashed from.

Layout of ``root / f"{slug(name)}-{sha256(key)[:16]}"``::

    key.json                    the key, checked on every open
    shards/00000003/fidelity.npy
    shards/00000003/manifest.json   dtype, shape and checksum of each array of the shard
    shared/ranks.npy
    shared/manifest.json
    locks/00000003.lock         only while a process builds shard 3
    .partial-<pid>-<token>@<host>   a shard or file being written

Every array is its own ``.npy`` file, so readers memory-map them (``.npz`` archives cannot be
mapped) and many environment copies in subprocesses share one copy in the page cache.

Writes are atomic (a ``.partial-*`` folder renamed into place) and shards immutable. A
per-shard :class:`filelock.FileLock` keeps two processes from building the same shard;
:meth:`ShardStore.build` is the resumable build loop, and
:func:`drrl_env.store_workers.build_in_workers` runs it in several spawned processes.

Every shard and the shared arrays carry a manifest (JSON) written in the same atomic rename:
per array its dtype, shape and a BLAKE2b-128 checksum of its bytes. The first read of a shard
by a store instance checks that every listed array is present and readable, that dtype,
shape and checksum match the manifest, then the optional :class:`ArraySpec` of each array
(kind, shape, finiteness, range, rows summing to 1). A failure raises
:class:`CorruptShardError` naming the shard, the array and the fix; a folder without a
manifest (written by an older version, or damaged) fails the same way. Verified shards stay
memory-mapped in a bounded least-recently-used table shared by the stores of the process, so
reading one again is a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
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

MANIFEST = "manifest.json"
"""The file beside a shard's (or the shared) arrays recording each one's dtype, shape, checksum."""
MANIFEST_FORMAT = 1
CHECKSUM = "blake2b-128"
"""The content checksum of the manifests: BLAKE2b with a 16-byte digest of the array's bytes."""
OPEN_SHARDS = 256
"""Verified shards a process keeps memory-mapped (fewer when its open-file limit is low)."""

_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PARTIAL = re.compile(r"\.partial-(?P<pid>\d+)-(?P<token>[0-9a-f]+)@(?P<host>.+)")
_LOCK_ATTEMPTS = 3  # retries when a lock file was unlinked by its previous holder
_WAIT_STEP = 1.0  # seconds a waiter blocks on a lock before it re-checks the shard


class StoreKeyError(ValueError):
    """A store folder's ``key.json`` is unreadable or records another key."""


class StoreNotWritableError(PermissionError):
    """A store folder cannot be written (read-only cache, wrong owner, full disk)."""


class CorruptShardError(ValueError):
    """A shard or the shared arrays failed verification; the message names the fix.

    Attributes:
        folder: The folder of the shard (or of the shared arrays).
        index: The shard's index; None for the shared arrays.
        array: The array at fault; None when the whole folder is (no readable manifest).
        reason: What is wrong, e.g. ``"holds 1 non-finite value (nan at [0, 1, 3])"``.
    """

    def __init__(
        self,
        message: str,
        folder: str | os.PathLike[str] | None = None,
        index: int | None = None,
        array: str | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.folder = None if folder is None else Path(folder)
        self.index, self.array, self.reason = index, array, reason

    def __reduce__(self) -> tuple:
        args = (str(self), self.folder, self.index, self.array, self.reason)
        return type(self), args, self.__dict__


class CorruptShardWarning(UserWarning):
    """A corrupt shard was found and is rebuilt (the message names it and the reason)."""


_KINDS = {"f": "floats", "i": "signed integers", "u": "unsigned integers", "b": "booleans"}


def _where(values: np.ndarray, bad: np.ndarray) -> str:
    """The first flagged value of ``values`` and its index, e.g. ``nan at [0, 1, 3]``."""
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    value = values[index] if index else values[()]
    text = f"{float(value):.6g}" if values.dtype.kind in "fiu" else repr(value)
    return f"{text} at {list(index)}" if index else text


@dataclass(frozen=True)
class ArraySpec:
    """What an array must hold besides matching its manifest, checked on its first read.

    Attributes:
        kinds: Allowed numpy dtype kinds: ``"f"`` floats, ``"iu"`` integers, ``"b"`` bools.
        shape: The expected shape; a None entry accepts any length (None: any shape).
        finite: Floats must be finite (no NaN, no infinity).
        low: Values must be at least ``low`` (above it when ``strict``); None: no bound.
        high: Values must be at most ``high``; None: no bound.
        strict: ``low`` itself is not allowed (e.g. FLOPs > 0).
        row_sum: Each row along the last axis must sum to this (spectra sum to 1).
        tolerance: Slack of the bounds and of ``row_sum`` for round-off.
        optional: The array may be absent.
    """

    kinds: str = "f"
    shape: tuple[int | None, ...] | None = None
    finite: bool = True
    low: float | None = None
    high: float | None = None
    strict: bool = False
    row_sum: float | None = None
    tolerance: float = 1e-6
    optional: bool = False

    def _shape_text(self) -> str:
        items = ["?" if n is None else str(n) for n in self.shape or ()]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"

    def problem(self, array: np.ndarray) -> str | None:
        """Why ``array`` breaks this spec (a phrase), or None when it holds."""
        if array.dtype.kind not in self.kinds:
            wanted = " or ".join(_KINDS.get(kind, kind) for kind in self.kinds)
            return f"has dtype {array.dtype}, expected {wanted}"
        if self.shape is not None and (
            len(self.shape) != array.ndim
            or any(n not in (None, got) for n, got in zip(self.shape, array.shape, strict=True))
        ):
            return f"has shape {tuple(array.shape)}, expected {self._shape_text()}"
        values = np.asarray(array)
        if values.dtype.kind not in "fiu" or values.size == 0:
            return None
        checks = []
        if self.finite and values.dtype.kind == "f":
            checks.append(("non-finite", ~np.isfinite(values)))
        if self.low is not None:
            if self.strict:
                checks.append((f"<= {self.low:g}", ~(values > self.low)))
            else:
                checks.append((f"< {self.low:g}", values < self.low - self.tolerance))
        if self.high is not None:
            checks.append((f"> {self.high:g}", values > self.high + self.tolerance))
        for what, bad in checks:
            if bad.any():
                count = int(np.count_nonzero(bad))
                return f"holds {count} {what} value{'s' * (count > 1)} ({_where(values, bad)})"
        if self.row_sum is not None and values.ndim:
            sums = values.sum(axis=-1, dtype=np.float64)
            bad = ~(np.abs(sums - self.row_sum) <= self.tolerance * max(1.0, abs(self.row_sum)))
            if bad.any():
                count = int(np.count_nonzero(bad))
                return (
                    f"has {count} row{'s' * (count > 1)} not summing to {self.row_sum:g} "
                    f"(sum {_where(sums, bad)})"
                )
        return None


def _digest(array: np.ndarray) -> str:
    """The content checksum of an array: BLAKE2b-128 of its C-ordered bytes, in hex."""
    return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).hexdigest()


def _file_budget() -> int:
    """Memory maps (each holds a file descriptor) a process may keep open for verified shards."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 8192
    return max(64, soft // 4)


class _OpenShards:
    """Memory maps of verified shards, least recently used dropped first, shared by a process.

    Keys are ``(store folder, index)`` (index None for the shared arrays); values are the
    ``(signature, arrays)`` a store verified. At most ``windows`` shards and ``files`` maps.
    """

    def __init__(self, windows: int, files: int) -> None:
        self.entries: OrderedDict[tuple[str, int | None], tuple[tuple, dict]] = OrderedDict()
        self.windows, self.files, self.open_files = windows, files, 0
        self.lock = threading.Lock()

    def get(self, key: tuple[str, int | None]) -> tuple[tuple, dict] | None:
        entry = self.entries.get(key)
        if entry is not None:
            try:
                self.entries.move_to_end(key)
            except KeyError:  # dropped by another thread meanwhile
                pass
        return entry

    def put(self, key: tuple[str, int | None], signature: tuple, arrays: dict) -> tuple:
        with self.lock:
            self._pop(key)
            self.entries[key] = (signature, arrays)
            self.open_files += len(arrays)
            while len(self.entries) > 1 and (
                len(self.entries) > self.windows or self.open_files > self.files
            ):
                _, (_, dropped) = self.entries.popitem(last=False)
                self.open_files -= len(dropped)
            return self.entries[key]

    def _pop(self, key: tuple[str, int | None]) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.open_files -= len(old[1])

    def drop(self, key: tuple[str, int | None]) -> None:
        with self.lock:
            self._pop(key)

    def drop_folder(self, folder: str) -> None:
        with self.lock:
            for key in [key for key in self.entries if key[0] == folder]:
                self._pop(key)


_OPEN = _OpenShards(OPEN_SHARDS, _file_budget())


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


def _save_manifest(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the manifest of ``arrays`` (dtype, shape, checksum of each) and flush it."""
    entries = [
        f"    {json.dumps(name)}: "
        + json.dumps({"dtype": a.dtype.str, "shape": list(a.shape), "checksum": _digest(a)})
        for name, a in sorted(arrays.items())
    ]
    head = json.dumps({"format": MANIFEST_FORMAT, "checksum": CHECKSUM})[:-1]
    text = head + ', "arrays": {\n' + ",\n".join(entries) + "\n}}\n"  # one line per array
    with open(path, "x") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _signature(folder: Path) -> tuple:
    """Name, inode, size and modification time of every file of ``folder``, sorted."""
    with os.scandir(folder) as entries:
        stats = [(entry.name, entry.stat()) for entry in entries]
    return tuple(sorted((n, s.st_ino, s.st_size, s.st_mtime_ns) for n, s in stats))


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
        shard_spec: What each shard's arrays must hold (:class:`ArraySpec` by array name),
            checked on the first read besides the manifest; arrays it names must be present
            unless optional. Settable later (attribute ``shard_spec``).
        shared_spec: The same for the shared arrays (attribute ``shared_spec``).
        unit: What a shard is called in error messages (e.g. ``"window"``).
        hint: How to fix a corrupt shard or shared array, ending every
            :class:`CorruptShardError` message (default: delete the folder named and build
            again). Settable later (attribute ``hint``).

    Raises:
        StoreKeyError: The folder exists and its ``key.json`` is unreadable or records a
            different key (a hash collision or a corrupt file). The store is not rebuilt:
            delete the folder named in the message to rebuild it.
        TypeError: ``key`` is not a JSON-serializable dict.
        ValueError: ``name`` has no character usable in a folder name.

    Opening an existing store checks its key and removes partial files of dead writers
    (when the folder is writable). Readers need no write permission. Reads verify (see the
    module docstring) and raise :class:`CorruptShardError`; each store instance verifies a
    shard once (again if its files change on disk), so a new instance re-checks.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        key: Mapping[str, Any],
        name: str,
        *,
        stale_after: float = STALE_AFTER,
        shard_spec: Mapping[str, ArraySpec] | None = None,
        shared_spec: Mapping[str, ArraySpec] | None = None,
        unit: str = "shard",
        hint: str | None = None,
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
        self.shard_spec = dict(shard_spec or {})
        self.shared_spec = dict(shared_spec or {})
        self.unit, self.hint = unit, hint
        self._id = os.path.abspath(self.folder)
        self._verified: dict[int | None, tuple] = {}  # index -> signature of what was verified
        self._created: list[Path] = []  # folders above ``folder`` that _prepare created
        self._ready = False
        if self.folder.is_dir():
            self._check_key()
            self.remove_stale()

    def __repr__(self) -> str:
        return f"ShardStore(name={self.name!r}, folder='{self.folder}')"

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without what this process verified: another process checks for itself."""
        return {**self.__dict__, "_verified": {}, "_created": []}

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
        above, created = self.folder.parent, []
        while not above.exists() and above != above.parent:
            created.append(above)
            above = above.parent
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
        self._created = created or self._created
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
        """The verified arrays of shard ``index``, read-only ``np.memmap`` views when ``mmap``.

        The first read by this instance verifies the shard; later ones are a lookup in the
        process's table of open shards (the arrays are the same objects: do not write them).

        Raises:
            FileNotFoundError: The shard is not built.
            CorruptShardError: The shard fails verification.
        """
        if mmap and not isinstance(index, bool):
            entry = _OPEN.get((self._id, index))
            if entry is not None and entry[0] is self._verified.get(index):
                return dict(entry[1])
        index = _check_index(index)
        arrays = self._read(index)
        return dict(arrays) if mmap else {name: np.array(a) for name, a in arrays.items()}

    def has_shared(self) -> bool:
        """Whether the shared arrays are written."""
        return self._shared.is_dir()

    def read_shared(self, mmap: bool = True) -> dict[str, np.ndarray]:
        """The verified shared arrays, read-only ``np.memmap`` views when ``mmap``.

        Raises:
            FileNotFoundError: No shared arrays were written.
            CorruptShardError: The shared arrays fail verification.
        """
        arrays = self._read(None)
        return dict(arrays) if mmap else {name: np.array(a) for name, a in arrays.items()}

    # Verification.

    def _describe(self, index: int | None) -> str:
        return "the shared arrays" if index is None else f"{self.unit} {index}"

    def corrupt_error(self, index: int | None, array: str | None, reason: str) -> CorruptShardError:
        """The error for a failed check of shard ``index`` (None: the shared arrays).

        Its message names the shard, the array (None: the whole folder), the reason, the
        file and the fix (:attr:`hint`).
        """
        folder = self._shared if index is None else self._shard_path(index)
        subject = f"array {array!r}" if array else "the folder"
        path = folder / (f"{array}.npy" if array else "")
        if self.hint:
            fix = self.hint
        elif index is None:
            fix = f"delete {self.folder} and build the store again"
        else:
            fix = f"delete {folder} and build again (only missing {self.unit}s are built)"
        what = self._describe(index)
        verb = "are" if index is None else "is"
        message = f"{what} {verb} corrupt: {subject} {reason} ({path}). Fix: {fix}"
        return CorruptShardError(message, folder, index, array, reason)

    def _manifest(self, folder: Path, index: int | None) -> dict[str, dict[str, Any]]:
        """The per-array entries of ``folder``'s manifest, checked for form."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            reason = f"has no {MANIFEST} (written by an older version, or damaged)"
            raise self.corrupt_error(index, None, reason) from None
        except (OSError, ValueError) as error:
            reason = f"has an unreadable {MANIFEST} ({error})"
            raise self.corrupt_error(index, None, reason) from error
        try:
            if manifest["format"] != MANIFEST_FORMAT or manifest["checksum"] != CHECKSUM:
                format_, checksum = manifest["format"], manifest["checksum"]
                raise ValueError(f"format {format_!r}, checksum {checksum!r}")
            entries = manifest["arrays"]
            for name, entry in entries.items():
                if not _ARRAY_NAME.fullmatch(name):
                    raise ValueError(f"array name {name!r}")
                np.dtype(entry["dtype"])
                if not all(isinstance(n, int) and n >= 0 for n in entry["shape"]):
                    raise ValueError(f"shape {entry['shape']!r}")
                if not isinstance(entry["checksum"], str):
                    raise ValueError(f"checksum {entry['checksum']!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            reason = f"has a malformed {MANIFEST} ({type(error).__name__}: {error})"
            raise self.corrupt_error(index, None, reason) from error
        return entries

    def _verify(self, folder: Path, index: int | None, content: bool) -> dict[str, np.ndarray]:
        """Map the arrays of ``folder`` checked against the manifest and, if ``content``,
        their checksums and the spec."""
        arrays = {}
        for name, entry in self._manifest(folder, index).items():
            path = folder / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                reason = "is missing (its manifest lists it)"
                raise self.corrupt_error(index, name, reason) from None
            except Exception as error:  # noqa: BLE001 (any parse error means a damaged file)
                reason = f"cannot be read ({type(error).__name__}: {error})"
                raise self.corrupt_error(index, name, reason) from error
            if array.dtype.str != entry["dtype"]:
                recorded = np.dtype(entry["dtype"])
                reason = f"has dtype {array.dtype}, its manifest records {recorded}"
                raise self.corrupt_error(index, name, reason)
            if list(array.shape) != entry["shape"]:
                recorded = tuple(entry["shape"])
                reason = f"has shape {array.shape}, its manifest records {recorded}"
                raise self.corrupt_error(index, name, reason)
            if content and _digest(array) != entry["checksum"]:
                reason = "fails its checksum (its bytes changed after it was written)"
                raise self.corrupt_error(index, name, reason)
            arrays[name] = array
        if content:
            spec = self.shared_spec if index is None else self.shard_spec
            for name, wanted in spec.items():
                if name not in arrays:
                    if not wanted.optional:
                        raise self.corrupt_error(index, name, "is missing")
                    continue
                problem = wanted.problem(arrays[name])
                if problem is not None:
                    raise self.corrupt_error(index, name, problem)
        return arrays

    def _read(self, index: int | None) -> dict[str, np.ndarray]:
        """The arrays of shard ``index`` (None: shared), verified once by this instance.

        A shard is verified again when its files changed on disk since (name, inode, size
        or modification time). Verified arrays enter the process's table of open shards.
        """
        folder = self._shared if index is None else self._shard_path(index)
        try:
            signature = _signature(folder)
        except (FileNotFoundError, NotADirectoryError):
            where = "the shared arrays" if index is None else f"{self.unit} {index}"
            raise FileNotFoundError(
                f"{where} of {self.folder} {'were' if index is None else 'was'} not written "
                f"({folder} does not exist)"
            ) from None
        key = (self._id, index)
        entry = _OPEN.get(key)
        trusted = self._verified.get(index) == signature
        if trusted and entry is not None and entry[0] == signature:
            self._verified[index] = entry[0]
            return entry[1]
        arrays = self._verify(folder, index, content=not trusted)
        if entry is None or entry[0] != signature:
            entry = _OPEN.put(key, signature, arrays)
        self._verified[index] = entry[0]
        return entry[1]

    def _forget(self, index: int | None) -> None:
        """Drop what this process verified of shard ``index`` (None: the shared arrays)."""
        self._verified.pop(index, None)
        _OPEN.drop((self._id, index))

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
        """Write ``arrays`` and their manifest into a partial folder renamed to ``target``."""
        if not self._shards.is_dir():  # removed by discard_if_empty of another instance
            self._ready = False
            self._prepare()
        staging = self._partial_path()
        try:
            staging.mkdir()
            for name, array in arrays.items():
                _save(staging / f"{name}.npy", array)
            _save_manifest(staging / MANIFEST, arrays)
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
        index = _check_index(index)
        self._forget(index)
        shard = self._shard_path(index)
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
        self._forget(None)
        retired = self._partial_path()
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._shared, retired)
        try:
            return self._publish(checked, self._shared)
        finally:
            _remove(retired)

    def remove_all(self) -> bool:
        """Delete the whole store: every shard, the shared arrays and the key.

        Processes that mapped its arrays keep reading them; do not call it while another
        process builds the store. True if the folder existed.
        """
        _OPEN.drop_folder(self._id)
        self._verified.clear()
        self._ready = False
        retired = self.root / self._partial_path().name
        try:
            os.rename(self.folder, retired)
        except FileNotFoundError:
            return False
        _remove(retired)
        return True

    def discard_if_empty(self) -> bool:
        """Delete the folder if it holds nothing yet (a first build that failed early).

        Only a folder with no shard, no shared arrays and nothing being written is removed,
        with the parent folders this instance created. True if it was removed.
        """
        self._ready = False
        if self.indices() or self.has_shared():
            return False
        try:
            for folder in (self._shards, self._locks):
                os.rmdir(folder)  # fails unless empty
            if {entry.name for entry in os.scandir(self.folder)} - {self._key_file.name}:
                return False
            with contextlib.suppress(FileNotFoundError):
                self._key_file.unlink()
            os.rmdir(self.folder)
        except OSError:
            return False
        for folder in self._created:
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []
        return True

    # Building.

    @contextlib.contextmanager
    def _locked(self, index: int, timeout: float) -> Iterator[bool]:
        """Hold shard ``index``'s lock for the ``with`` block; yield False if busy."""
        self._prepare()
        path = self._lock_path(index)
        lock = _acquire(path, timeout)
        if lock is None:
            yield False
            return
        try:
            yield True
        finally:
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # while held, so no waiter locks a file about to vanish
            finally:
                lock.release()

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
        with self._locked(index, timeout) as held:
            yield held and not self.has_shard(index)

    def rebuild_shard(
        self, index: int, build_fn: BuildFn, *, wait_timeout: float | None = None
    ) -> bool:
        """Replace a corrupt shard ``index`` by ``build_fn(index)``, under the shard's lock.

        If the shard verifies once the lock is held (another process rebuilt it meanwhile),
        it is kept.

        Args:
            index: The shard.
            build_fn: Computes the shard's arrays.
            wait_timeout: Seconds to wait for another process holding the lock; None waits.

        Returns:
            True if this call rebuilt the shard.

        Raises:
            StoreNotWritableError: The folder is not writable.
            TimeoutError: Another process held the lock past ``wait_timeout``.
        """
        index = _check_index(index)
        self.check_writable()
        timeout = float("inf") if wait_timeout is None else wait_timeout
        with self._locked(index, timeout) as held:
            if not held:
                raise TimeoutError(
                    f"{self.unit} {index} of {self.folder} is locked by another process "
                    f"after {wait_timeout} s"
                )
            self._forget(index)
            try:
                self._read(index)
                return False
            except (CorruptShardError, FileNotFoundError):
                pass
            self.remove_shard(index)
            self._build_one(index, build_fn)
            return True

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

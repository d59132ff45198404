"""Run folders, incremental result tables and trial executors shared by the experiment scripts.

A script validates its arguments, then opens its :class:`RunFolder` (refusing to mix two runs
in one folder unless told to ``overwrite`` or ``resume``), appends result rows to a
:class:`RowLog` as each piece of work finishes, and builds its final tables from that log. A
resumed run skips the keys the log already holds, so an interrupted run loses nothing and
ends with the tables of an uninterrupted one::

    folder = RunFolder(Path("results") / check_run_name(name), resume=True)
    folder.check(args)                 # before any write: the error names what differs
    folder.prepare(args)               # makes / cleans the folder, writes config.json
    log = RowLog(folder.path / "table.csv", key=("method", "rank"))
    for method, rank in jobs:
        if log.key_of({"method": method, "rank": rank}) not in log.keys():
            log.append([measure(method, rank)])

:func:`execute` runs one picklable function over a list of tasks locally or as Ray tasks
(``pip install 'drrl-gym[ray]'``; Ray is imported only then) and yields results as they
finish, so the caller writes each one at once.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

# The executors live in drrl_env (cache builds use them too); their names are kept here.
from drrl_env.devices import default_device
from drrl_env.executors import (  # noqa: F401
    EXECUTORS,
    RAY_INSTALL,
    execute,
    import_ray,
    ray_session,
)

CONFIG_FILE = "config.json"


class ArgumentError(ValueError):
    """A command-line argument or the state of the run folder forbids starting the run."""


# -- argument checks --------------------------------------------------------------------------


RESULT_FREE = ("out_dir", "run_name", "overwrite", "resume", "threads")
"""The :class:`RunArgs` fields that change where and how fast a run goes, not its numbers (the
device changes them: float kernels differ between devices, so a resume keeps it)."""


@dataclass(frozen=True)
class RunArgs:
    """The arguments every script with a run folder shares; a script's ``Args`` extends it
    (and may give ``run_name`` its own default)."""

    out_dir: str = "results"
    """Parent folder of the run folder."""
    run_name: str = "run"
    """Run folder inside out_dir."""
    overwrite: bool = False
    """Start again in an existing run folder."""
    resume: bool = False
    """Keep what the run finished and do the rest."""
    device: str = field(default_factory=default_device)
    """Torch device of the model (default: cuda when torch sees a GPU)."""
    threads: int = 2
    """Torch threads."""

    def __post_init__(self) -> None:
        """Check the fields every script shares (a script's ``__post_init__`` calls this)."""
        check_run_name(self.run_name)
        check_device(self.device)

    def run_folder(self, ignored: Sequence[str] = RESULT_FREE) -> RunFolder:
        """The run folder, checked against these arguments (``ignored`` fields may differ
        on ``--resume``)."""
        folder = RunFolder(
            Path(self.out_dir) / self.run_name,
            overwrite=self.overwrite,
            resume=self.resume,
            ignored=tuple(ignored),
            defaults=field_defaults(type(self)),
        )
        folder.check(asdict(self))
        return folder


def field_defaults(cls: type) -> dict[str, Any]:
    """Each dataclass field's default value (fields without one are left out)."""
    defaults = {}
    for item in fields(cls):
        if item.default is not MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not MISSING:
            defaults[item.name] = item.default_factory()
    return defaults


@dataclass(frozen=True)
class BenchmarkArgs(RunArgs):
    """The run arguments of a benchmark: its ratios are measured side by side in one run, so
    a run is never resumed (``--overwrite`` measures again)."""

    out_dir: str = "results/benchmarks"
    """Parent folder of the run folder."""

    def __post_init__(self) -> None:
        if self.resume:
            raise ArgumentError(
                "a benchmark is not resumed: its numbers are compared side by side within "
                "one run; use --overwrite to measure again"
            )
        super().__post_init__()


def registered_id(env_id: str, *, cached: bool = False, budgeted: bool = False) -> dict:
    """The ``gym.make`` keywords of the registered id ``env_id``.

    Args:
        env_id: A name of ``drrl_env.ENV_IDS``.
        cached: Require an id on the cached backend.
        budgeted: Require an id with a FLOPs budget.

    Raises:
        ArgumentError: ``env_id`` is not registered (the message lists the ids) or lacks
            what is required.
    """
    import drrl_env

    kwargs = drrl_env.ENV_IDS.get(env_id)
    if kwargs is None:
        raise ArgumentError(
            f"env_id: {env_id!r} is not registered; registered: {', '.join(drrl_env.ENV_IDS)}"
        )
    if cached and kwargs.get("backend", "cached") != "cached":
        raise ArgumentError(f"env_id: {env_id!r} is not a cached id")
    if budgeted and kwargs.get("budget") is None:
        raise ArgumentError(f"env_id: {env_id!r} is not a budgeted id")
    return kwargs


def check_minimum(args: Any, names: Iterable[str], low: int = 1) -> None:
    """ArgumentError naming the first of the fields ``names`` of ``args`` below ``low``."""
    for name in names:
        if getattr(args, name) < low:
            raise ArgumentError(f"{name} must be >= {low}, got {getattr(args, name)}")


def check_budgets(budgets: Sequence[float]) -> None:
    """ArgumentError unless ``budgets`` is a non-empty set of fractions in (0, 1]."""
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ArgumentError(f"budgets must be in (0, 1], got {tuple(budgets)}")
    if len(set(budgets)) != len(budgets):
        raise ArgumentError("budgets must not repeat")


def check_run_name(name: str) -> str:
    """Return ``name`` if it names one folder inside the output folder.

    Raises:
        ArgumentError: ``name`` is empty, ``.`` or ``..``, absolute, or holds a path separator.
    """
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    if (
        not name
        or name in (".", "..")
        or any(s in name for s in separators)
        or "\0" in name
        or Path(name).is_absolute()
    ):
        raise ArgumentError(
            f"run_name={name!r} must be a single folder name (no '/', '\\', '..' or absolute "
            "path): the run folder is always created inside out_dir"
        )
    return name


def check_device(device: str) -> None:
    """Raise if ``device`` is not a torch device this machine has.

    The checks of :func:`drrl_env.devices.check_device`, as an :class:`ArgumentError`.

    Raises:
        ArgumentError: Not a device string, CUDA asked on a torch build or machine without
            it (the message says how to install a CUDA build), a CUDA index out of range, or
            MPS where it is missing.
    """
    from drrl_env.devices import check_device as check

    try:
        check(device)
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def check_unique(name: str, values: Sequence[Any]) -> None:
    """Raise ArgumentError naming ``name`` and the first value given twice."""
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ArgumentError(f"{name}: {value!r} is given twice")
        seen.add(value)


MAX_SEED = 2**32 - 1
"""The largest seed every seeded library takes (NumPy's legacy ``np.random.seed``)."""


def check_seeds(name: str, seeds: Sequence[Any]) -> tuple[int, ...]:
    """Return ``seeds`` if they are at least one, each an int in 0..:data:`MAX_SEED`, unique.

    Raises:
        ArgumentError: No seed, a seed that is not an int (a bool is not), one outside
            0..:data:`MAX_SEED`, or one given twice; the message names ``name`` and the seed.
    """
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence):
        raise ArgumentError(f"{name} must be a sequence of ints, got {seeds!r}")
    if not seeds:
        raise ArgumentError(f"{name} must name at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ArgumentError(
                f"{name}: {seed!r} ({type(seed).__name__}) is not a seed; seeds are ints in "
                f"0..{MAX_SEED} (the range NumPy, PyTorch and Gymnasium all accept)"
            )
    check_unique(name, seeds)
    return tuple(seeds)


def check_executor(executor: str, address: str | None, ray_num_cpus: int | None) -> None:
    """Raise ArgumentError for an unknown executor, Ray options without Ray, or Ray missing.

    Finds the ``ray`` package without importing it.
    """
    if executor not in EXECUTORS:
        raise ArgumentError(f"executor={executor!r} is not one of {EXECUTORS}")
    if executor != "ray":
        for name, value in (("address", address), ("ray_num_cpus", ray_num_cpus)):
            if value is not None:
                raise ArgumentError(f"{name} is a Ray option; pass --executor ray with it")
        return
    if address is not None and ray_num_cpus is not None:
        raise ArgumentError(
            "ray_num_cpus sizes the local Ray instance started when --address is unset; a "
            "cluster at --address has its own CPUs (set them with `ray start --num-cpus`)"
        )
    if ray_num_cpus is not None and ray_num_cpus < 1:
        raise ArgumentError(f"ray_num_cpus must be >= 1, got {ray_num_cpus}")
    if importlib.util.find_spec("ray") is None:
        raise ArgumentError(f"executor='ray' needs Ray, which is not installed: {RAY_INSTALL}")


def run_main(main: Callable[[Any], Any], args: Any) -> None:
    """Run a script's ``main(args)``; an :class:`ArgumentError` exits 2 with its message on
    stderr (no traceback), Ctrl-C exits 130 (``main`` says what was kept)."""
    try:
        main(args)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def unsaved_models_note(noun: str, names: Sequence[str]) -> str | None:
    """What a resume says of finished agents (``names``) whose model is not saved, e.g. in
    committed results, which hold no ``models/``; None when every one is saved."""
    if not names:
        return None
    return (
        f"{len(names)} finished {noun} have no saved model (e.g. results without models/): "
        f"their rows are kept and they are not trained again; --overwrite trains and saves "
        f"every agent ({', '.join(names)})"
    )


# -- run folder -------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` as the JSON value it is stored as (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


class RunFolder:
    """One run's output folder: refuses to mix runs, cleans on overwrite, checks on resume.

    Args:
        path: The folder.
        overwrite: An existing folder's content is removed before the run starts.
        resume: An existing folder's finished results are kept (the caller skips them);
            its ``config.json`` must record the same arguments, except ``ignored``.
        ignored: Arguments that do not change results (output folder, executor, threads):
            they may differ on resume.
        defaults: Each argument's default value. An argument that a run's ``config.json``
            does not record (the script gained it after the run) matches on resume when it
            has its default, which is what the run did.

    Raises:
        ArgumentError: Both ``overwrite`` and ``resume``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        ignored: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        if overwrite and resume:
            raise ArgumentError(
                "overwrite and resume exclude each other: --overwrite starts the run again "
                "from an empty folder, --resume keeps its finished results"
            )
        self.path = Path(path)
        self.overwrite, self.resume = overwrite, resume
        self.ignored = frozenset(ignored)
        self.defaults = plain(dict(defaults or {}))

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def has_content(self) -> bool:
        """Whether the folder exists and holds anything."""
        return self.path.is_dir() and any(self.path.iterdir())

    @property
    def resuming(self) -> bool:
        """Whether :meth:`prepare` keeps earlier results (resume of a non-empty folder)."""
        return self.resume and self.has_content()

    def check(self, args: Mapping[str, Any]) -> None:
        """Raise if the run may not start in this folder; writes nothing.

        Raises:
            ArgumentError: The path is a file; the folder holds another run and neither
                ``overwrite`` nor ``resume`` is set; or, on resume, it has no readable
                ``config.json`` or that records other values of arguments that change
                results (the message names each with both values).
        """
        if self.path.exists() and not self.path.is_dir():
            raise ArgumentError(f"run folder {self.path} exists and is not a folder")
        if not self.has_content() or self.overwrite:
            return
        if not self.resume:
            raise ArgumentError(
                f"run folder {self.path} already holds a run; pass --resume to finish it "
                "(finished results are kept), --overwrite to delete its content and start "
                "again, or choose another folder"
            )
        recorded = self.recorded_args()
        different = self.differing_args(recorded, args)
        if different:
            details = ", ".join(
                f"{name} (run: {recorded.get(name, '<not recorded>')!r}, "
                f"now: {plain(args.get(name))!r})"
                for name in different
            )
            raise ArgumentError(
                f"cannot resume {self.path}: arguments that change results differ from its "
                f"{CONFIG_FILE}: {details}. Resume with the run's arguments, or use --overwrite "
                "or another folder"
            )

    def recorded_args(self) -> dict[str, Any]:
        """The ``args`` recorded in the folder's ``config.json``.

        Raises:
            ArgumentError: The file is missing or unreadable, or has no ``args``.
        """
        try:
            config = json.loads(self.config_path.read_text())
            return dict(config["args"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArgumentError(
                f"cannot resume {self.path}: no readable {CONFIG_FILE} with the run's "
                f"arguments ({type(error).__name__}: {error}); use --overwrite to start again"
            ) from None

    def differing_args(
        self, recorded: Mapping[str, Any], args: Mapping[str, Any], *, every: bool = False
    ) -> list[str]:
        """Names of the arguments, ``ignored`` left out unless ``every``, whose values differ
        (one the record lacks compares as its default, when it has one)."""
        current = plain(dict(args))
        names = (set(recorded) | set(current)) - (set() if every else self.ignored)
        missing = object()

        def was(name: str) -> Any:
            return recorded.get(name, self.defaults.get(name, missing))

        return sorted(n for n in names if was(n) != current.get(n, missing))

    def prepare(self, args: Mapping[str, Any], **metadata: Any) -> Path:
        """Check, then make the folder ready: created, emptied (overwrite) or kept (resume).

        A new or overwritten run gets a ``config.json`` with ``args`` and ``metadata``; a
        resumed run keeps its file (``args`` stay the first call's), counts the resumption
        and appends to ``args_resumed`` the arguments this call gives other values (``{}``
        when none), so a run grown on ``--resume`` records what each call asked for.

        Returns:
            The folder.
        """
        self.check(args)
        resuming = self.resuming
        if self.overwrite and self.has_content():
            for entry in self.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        if resuming:
            config = json.loads(self.config_path.read_text())
            current = plain(dict(args))
            names = self.differing_args(config.get("args", {}), current, every=True)
            changed = {n: current[n] for n in names if n in current}
            self.update_config(
                resumed=int(config.get("resumed", 0)) + 1,
                args_resumed=[*config.get("args_resumed", []), changed],
                **metadata,
            )
        else:
            write_atomic(self.config_path, _json({"args": plain(dict(args)), **metadata}))
        return self.path

    def update_config(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``config.json`` (written atomically); returns the whole.

        ``wall_s`` is the last run's wall time; each one is also appended to ``wall_s_runs``,
        so a run resumed several times keeps the time of every part.
        """
        config = json.loads(self.config_path.read_text()) if self.config_path.is_file() else {}
        if "wall_s" in fields:
            runs = config.get("wall_s_runs")
            if runs is None:  # a file from before the list: its wall_s is the first part
                runs = [config["wall_s"]] if "wall_s" in config else []
            config["wall_s_runs"] = [*runs, plain(fields["wall_s"])]
        config.update(plain(fields))
        write_atomic(self.config_path, _json(config))
        return config


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(partial, path)
    return path


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


# -- incremental table ------------------------------------------------------------------------


class RowLog:
    """A CSV table written row by row (append and flush) that knows which keys it holds.

    Floats are written with ``repr`` and read back exactly; NaN and None as empty fields.
    A last line cut by a crash is dropped when the log is opened.

    Args:
        path: The CSV file (created with its header on the first append).
        key: Columns that identify one unit of work (e.g. ``("method", "rank")``).

    Raises:
        ValueError: ``key`` is empty.
    """

    def __init__(self, path: str | Path, key: Sequence[str]) -> None:
        if not key:
            raise ValueError("key must name at least one column")
        self.path, self.key = Path(path), tuple(key)
        self._drop_torn_line()

    def key_of(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """The key of ``row`` as strings (as it reads back from the file)."""
        return tuple(_cell(row[name]) for name in self.key)

    def columns(self) -> list[str] | None:
        """The header, or None before the first row."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with self.path.open(newline="") as handle:
            return next(csv.reader(handle))

    def read(self) -> pd.DataFrame:
        """Every row (empty frame before the first), floats exactly as written."""
        if self.columns() is None:
            return pd.DataFrame(columns=list(self.key))
        return pd.read_csv(self.path, engine="python")  # Python's float(): exact

    def counts(self) -> dict[tuple[str, ...], int]:
        """Rows per key."""
        counts: dict[tuple[str, ...], int] = {}
        if self.columns() is None:
            return counts
        with self.path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                key = tuple(row[name] for name in self.key)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def keys(self) -> set[tuple[str, ...]]:
        """The keys with at least one row."""
        return set(self.counts())

    def sorted_by(self, order: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """Every row, ordered by the position of its key in ``order`` (file order within a key).

        Raises:
            ValueError: A row's key is not in ``order``.
        """
        frame = self.read()
        position = {self.key_of(entry): index for index, entry in enumerate(order)}
        keys = [self.key_of(row) for row in frame[list(self.key)].to_dict("records")]
        unknown = sorted({key for key in keys if key not in position})
        if unknown:
            raise ValueError(f"{self.path.name} holds rows of keys not in the order: {unknown}")
        ranks = pd.Series([position[key] for key in keys], index=frame.index)
        return frame.loc[ranks.sort_values(kind="stable").index].reset_index(drop=True)

    def append(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> int:
        """Append ``rows`` (all of one unit of work at once), flushed to disk; returns the count.

        Raises:
            ValueError: The rows' columns differ from the file's header, or lack a key column.
        """
        records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
        if not records:
            return 0
        columns = list(records[0])
        missing = [name for name in self.key if name not in columns]
        if missing:
            raise ValueError(f"rows lack the key column(s) {missing} of {self.path.name}")
        header = self.columns()
        if header is not None and header != columns:
            raise ValueError(
                f"rows have columns {columns}, {self.path.name} has {header}; a log holds one table"
            )
        for record in records:
            if list(record) != columns:
                raise ValueError(f"rows have different columns: {list(record)} vs {columns}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            if header is None:
                writer.writerow(columns)
            writer.writerows([_cell(record[c]) for c in columns] for record in records)
            handle.flush()
            os.fsync(handle.fileno())
        return len(records)

    def retain(self, keys: Iterable[tuple[str, ...]]) -> int:
        """Keep only the rows of ``keys`` (rewritten atomically); returns the rows dropped."""
        wanted = set(keys)
        if self.columns() is None:
            return 0
        with self.path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            index = [header.index(name) for name in self.key]
            rows = list(reader)
        kept = [row for row in rows if tuple(row[i] for i in index) in wanted]
        if len(kept) < len(rows):
            write_atomic(self.path, _csv_text([header, *kept]))
        return len(rows) - len(kept)

    def rewrite(self, frame: pd.DataFrame) -> Path:
        """Replace the whole file with ``frame`` (e.g. the final rows in canonical order)."""
        rows = [[_cell(value) for value in record] for record in frame.itertuples(index=False)]
        return write_atomic(self.path, _csv_text([list(frame.columns), *rows]))

    def _drop_torn_line(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            write_atomic(self.path, data[: data.rfind(b"\n") + 1])


def _cell(value: Any) -> str:
    """One CSV field: exact floats (``repr``), NaN and None empty, the rest as ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        number = float(value)
        return "" if math.isnan(number) else repr(number)
    if type(value).__name__.startswith(("int", "uint")):
        return str(int(value))
    return str(value)


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()

"""The cached backend: steps are lookups in teacher-forced rollouts stored once per config.

:class:`RolloutCache` measures, for every window of the split, what every action does at
every (segment, layer) with teacher forcing (the layer inputs are those of exact attention)
and keeps one shard per window in a :class:`~drrl_env.store.ShardStore` under the cache
directory. Shards are written atomically as they finish, so an interrupted build keeps
what it finished and resumes; two processes building the same cache split the windows
between them (per-window locks); a cache of fewer windows is extended, not rebuilt. The
arrays are memory-mapped, so many environment copies share one copy of the data, and
stepping needs neither torch nor the model.

Per window (shard): ``tokens`` (seq_len,), the raw terms ``cosine``, ``dnll_taylor`` and
``dnll_fisher`` (S, L, A), ``spectra`` (S, L, d), ``input_stats`` (S, L, 3), ``nll_full``
and ``mean_nll`` (exact attention); for a method whose cost depends on the input
(``topp``) also ``flops`` (S, L, A), the FLOPs each action realised, and ``kept`` (S, L, A),
its kept fraction of the causal keys. Shared: ``shape``, ``actions`` (A, 2),
``costs``/``flops_full`` (the :class:`~drrl_env.envs.backends.base.CostTable`),
``weight_stats`` (L, 3) and ``split_windows`` (windows the split holds).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrl_env.envs.actions import ActionGrid
from drrl_env.envs.backends.base import LayerView
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.observation import check_finite
from drrl_env.envs.problem import Problem
from drrl_env.lm.facts import ModelShape
from drrl_env.rewards import RAW_TERMS
from drrl_env.store import ArraySpec, CorruptShardError

CACHE_FORMAT = 5
"""Version of the cached arrays (5: every shard carries a manifest with checksums; folders of
earlier formats are never read)."""
TABLE_WINDOWS = 256
"""Windows whose lookup tables a cached backend keeps in memory (the most recent)."""
SHARD_ARRAYS = ("tokens", *RAW_TERMS, "spectra", "input_stats", "nll_full", "mean_nll")
OPTIONAL_SHARD_ARRAYS = ("flops", "kept")
"""Per-window arrays of methods whose cost depends on the input, shape (S, L, A)."""
SHARED_ARRAYS = ("shape", "actions", "costs", "flops_full", "weight_stats", "split_windows")
TERM_RANGES: dict[str, tuple[float | None, float | None]] = {
    "cosine": (-1.0, 1.0),
    "dnll_fisher": (0.0, None),
}
"""Documented bounds of the raw terms (:mod:`drrl_env.rewards.terms`); the others are finite."""
_COMMAND_FIELDS = (
    "model",
    "corpus",
    "data_path",
    "text_field",
    "eval_fraction",
    "seq_len",
    "segment_length",
    "method",
    "ranks",
    "keep",
    "keeps",
    "device",
)


def rebuild_command(config: EnvConfig) -> str:
    """The shell command that deletes and rebuilds the rollout cache of ``config``.

    It names the registered id that needs the fewest ``--set`` overrides to give ``config``.
    """
    import shlex

    from drrl_env import ENV_IDS

    best: tuple[str, EnvConfig, list[str]] | None = None
    for env_id, kwargs in ENV_IDS.items():
        try:
            base = EnvConfig(**{**kwargs, "backend": "cached"})
        except ValueError:
            continue
        overrides = [
            f"{name}={getattr(config, name)!r}"
            for name in _COMMAND_FIELDS
            if getattr(config, name) != getattr(base, name)
        ]
        if best is None or len(overrides) < len(best[2]):
            best = (env_id, base, overrides)
    if best is None:
        raise ValueError("no registered id builds a cached environment")
    env_id, base, overrides = best
    words = ["python", "-m", "drrl_env.build_cache", env_id, "--rebuild", "--splits", config.split]
    if config.max_windows is None and base.max_windows is not None:
        overrides.append("max_windows=None")
    elif config.max_windows != base.max_windows:
        words += ["--max-windows", str(config.max_windows)]
    for override in overrides:
        words += ["--set", override]
    if config.cache_dir is not None:
        words += ["--cache-dir", str(config.cache_dir)]
    return shlex.join(words)


def rollout_key(problem: Problem) -> dict[str, Any]:
    """What the rollouts of a problem depend on (not the reward weights, budget or term)."""
    from drrl_env.methods import method_class

    config = problem.config
    cls = method_class(config.method)
    return {
        **problem.data_key(),
        "split": config.split,
        "method": config.method,
        "method_module": f"{cls.__module__}:{cls.__qualname__}",
        "method_version": cls.version,
        "ranks": list(config.ranks) if config.ranks else None,
        "keeps": list(config.sparse_keeps),
        "terms": list(RAW_TERMS),
        "format": CACHE_FORMAT,
    }


class RolloutCache:
    """The rollout store of one configuration (split and all), verified on reading.

    Every window (shard) and the shared arrays carry a manifest with a checksum per array
    (:mod:`drrl_env.store`). On the first read in a process they are also checked against
    :meth:`shard_spec` / :meth:`shared_spec` (finite, in range, shaped for the
    configuration), and the shared arrays against each other and the configuration. A
    corrupt window is removed and rebuilt once, with a
    :class:`~drrl_env.store.CorruptShardWarning` naming it and the reason; corrupt shared
    arrays raise :class:`~drrl_env.store.CorruptShardError`, whose message gives the
    command that rebuilds the cache (:func:`rebuild_command`).

    Args:
        problem: The problem of the environment configuration (an
            :class:`~drrl_env.envs.config.EnvConfig` is turned into one).
    """

    def __init__(self, problem: Problem | EnvConfig) -> None:
        from drrl_env.store import ShardStore

        problem = problem if isinstance(problem, Problem) else Problem(problem)
        config = problem.config
        self.problem, self.config = problem, config
        self.store = ShardStore(
            problem.cache_root / "rollouts",
            rollout_key(problem),
            f"{config.model}-{config.method}-{config.split}",
            shard_spec=self.shard_spec(),
            shared_spec=self.shared_spec(),
            unit="window",
        )
        self.store.hint = (
            f"rebuild the cache with `{rebuild_command(config)}` (or delete {self.store.folder})"
        )
        self._shared: dict[str, np.ndarray] | None = None
        self._repaired: set[int] = set()

    # What the arrays must hold.

    def shard_spec(
        self, n_layers: int | None = None, n_actions: int | None = None
    ) -> dict[str, ArraySpec]:
        """The spec of a window's arrays; an unknown layer or action count matches any."""
        segments = self.config.n_segments
        cells = (segments, n_layers, n_actions)
        terms = {}
        for name in RAW_TERMS:
            low, high = TERM_RANGES.get(name, (None, None))
            terms[name] = ArraySpec("f", cells, low=low, high=high)
        return {
            "tokens": ArraySpec("iu", (self.config.seq_len,), low=0),
            **terms,
            "spectra": ArraySpec("f", (segments, n_layers, None), low=0.0, row_sum=1.0),
            "input_stats": ArraySpec("f", (segments, n_layers, 3)),
            "nll_full": ArraySpec("f", (), low=0.0),
            "mean_nll": ArraySpec("f", (), low=0.0),
            "flops": ArraySpec("f", cells, low=0.0, optional=True),
            "kept": ArraySpec("f", cells, low=0.0, high=1.0, optional=True),
        }

    def shared_spec(self) -> dict[str, ArraySpec]:
        """The spec of the shared arrays (their cross-checks: :meth:`shared`)."""
        segments = self.config.n_segments
        return {
            "shape": ArraySpec("iu", (4,), low=1),
            "actions": ArraySpec("f", (None, 2), low=0.0),
            "costs": ArraySpec("f", (segments, None), low=0.0),
            "flops_full": ArraySpec("f", (segments,), low=0.0, strict=True),
            "weight_stats": ArraySpec("f", (None, 3)),
            "split_windows": ArraySpec("iu", (), low=1),
        }

    def _shared_problem(self, shared: dict[str, np.ndarray]) -> tuple[str, str] | None:
        """The array and reason of the first disagreement of the shared arrays, or None."""
        shape = ModelShape.from_array(shared["shape"])
        if shape.n_heads % shape.n_kv_heads:
            return "shape", f"says {shape.n_heads} heads share {shape.n_kv_heads} kv heads"
        rows = len(shared["weight_stats"])
        if rows != shape.n_layers:
            return "shape", f"says {shape.n_layers} layers but weight_stats has {rows} rows"
        try:
            stored = ActionGrid.from_array(shared["actions"], shape.head_dim)
            expected = ActionGrid.from_config(self.config, shape.head_dim)
        except ValueError as error:
            return "actions", f"is no action grid at head_dim {shape.head_dim} ({error})"
        if stored != expected:
            return "actions", (
                f"holds {stored.as_array().tolist()}, the configuration's grid at head_dim "
                f"{shape.head_dim} is {expected.as_array().tolist()}"
            )
        columns = shared["costs"].shape[1]
        if columns != len(stored):
            return "costs", f"has {columns} columns for {len(stored)} actions"
        held, present = int(shared["split_windows"]), self.store.indices()
        if present and present[-1] >= held:
            return "split_windows", f"says {held} windows, but window {present[-1]} is cached"
        return None

    def shared(self) -> dict[str, np.ndarray]:
        """The shared arrays (in memory), verified and cross-checked once per instance.

        Raises:
            FileNotFoundError: They are not written yet.
            CorruptShardError: They fail verification or disagree with each other or with
                the configuration; the message gives the rebuild command.
        """
        if self._shared is None:
            shared = self.store.read_shared(mmap=False)
            problem = self._shared_problem(shared)
            if problem is not None:
                raise self.store.corrupt_error(None, *problem)
            n_layers, n_actions = int(shared["shape"][0]), len(shared["actions"])
            self.store.shard_spec = self.shard_spec(n_layers, n_actions)
            self._shared = shared
        return dict(self._shared)

    # Reading.

    def wanted(self) -> list[int] | None:
        """Window indices the config asks for, or None until the split's size is known."""
        if not self.store.has_shared():
            return None
        held = int(self.shared()["split_windows"])
        count = held if self.config.max_windows is None else min(held, self.config.max_windows)
        return list(range(count))

    def missing(self) -> list[int] | None:
        """Windows still to build (None: nothing is known yet, everything is to build)."""
        wanted = self.wanted()
        return None if wanted is None else self.store.missing(wanted)

    def shard(self, index: int) -> dict[str, np.ndarray]:
        """The verified, memory-mapped arrays of window ``index``.

        The first read in a process verifies the window; later ones are a lookup in the
        process's table of open windows (:data:`drrl_env.store.OPEN_SHARDS`). A corrupt
        window is removed and rebuilt once per instance, with a
        :class:`~drrl_env.store.CorruptShardWarning`; a window removed meanwhile (by another
        process repairing it) is built or waited for.

        Raises:
            CorruptShardError: The window is still corrupt after its rebuild or cannot be
                rebuilt (read-only cache), or the shared arrays are corrupt.
            FileNotFoundError: The window is not cached and not in the split.
        """
        if self._shared is None:
            self.shared()
        try:
            return self.store.read_shard(index)
        except CorruptShardError as error:
            return self._repair(index, error)
        except FileNotFoundError:
            if not 0 <= index < int(self._shared["split_windows"]):
                raise
            self.store.build([index], window_builder(self.problem), progress=False)
            return self.store.read_shard(index)

    def _repair(self, index: int, error: CorruptShardError) -> dict[str, np.ndarray]:
        """Remove and rebuild the corrupt window ``index`` (once), then read it."""
        import warnings

        from drrl_env.store import CorruptShardWarning, StoreNotWritableError

        array = f"array {error.array!r} " if error.array else ""
        found = f"window {index} of {self.store.folder} is corrupt: {array}{error.reason}"
        fix = f"rebuild the cache with `{rebuild_command(self.config)}`"
        details = (error.folder, index, error.array, error.reason)
        if index in self._repaired:
            message = f"{found}, again after it was rebuilt (are the shared arrays wrong?); {fix}"
            raise CorruptShardError(message, *details) from error
        self._repaired.add(index)
        warnings.warn(f"{found}; removing and rebuilding it", CorruptShardWarning, stacklevel=3)
        try:
            self.store.rebuild_shard(index, window_builder(self.problem))
        except StoreNotWritableError as unwritable:
            message = f"{found}; it cannot be rebuilt here ({unwritable}); {fix}"
            raise CorruptShardError(message, *details) from unwritable
        try:
            return self.store.read_shard(index)
        except CorruptShardError as again:
            return self._repair(index, again)

    def verify(self) -> list[int]:
        """Read every wanted window once, rebuilding corrupt ones; return those rebuilt."""
        before = set(self._repaired)
        for index in self.wanted() or []:
            self.shard(index)
        return sorted(self._repaired - before)

    # Building.

    def prepare(self) -> None:
        """Check the folder is writable, then write the shared arrays if they are missing.

        Raises:
            StoreNotWritableError: The folder is not writable (before the model is loaded).
            ValueError: The configuration does not fit the model or the text (see
                :meth:`write_shared`; nothing is left on disk).
        """
        self.store.check_writable()
        if not self.store.has_shared():
            self.write_shared()

    def build(
        self, workers: int = 1, progress: bool = True, threads: int | None = None
    ) -> list[int]:
        """Build the shared arrays and every missing window, resumably.

        Args:
            workers: Processes splitting the windows (spawned; each loads the model).
            progress: Show a progress bar.
            threads: Torch threads per worker (default: torch's own choice for one worker,
                1 for several).

        Returns:
            The windows this call built (other processes may have built the others).
        """
        from drrl_env.store_workers import build_in_workers

        self.prepare()
        wanted = self.wanted()
        if not self.store.missing(wanted):
            return []
        threads = threads if threads is not None else (None if workers == 1 else 1)
        return build_in_workers(
            self.store,
            wanted,
            window_builder,
            # one process builds with this problem (its model and method are loaded once);
            # spawned workers receive the picklable configuration and pose it again
            (self.problem if workers == 1 else self.config, threads),
            workers=workers,
            progress=progress,
            desc=f"caching {self.config.model} {self.config.method} {self.config.split}",
        )

    def write_shared(self) -> None:
        """Measure and store the arrays every window shares (model shape, grid, costs).

        The configuration is checked against the model and the text first (context
        length, rank grid, windows of the split), before the costs are counted. If it is
        refused, the store folder is removed again when it holds nothing else (with the
        parent folders its :meth:`~drrl_env.store.ShardStore.check_writable` created).

        Raises:
            ValueError: The configuration does not fit the model or the text.
        """
        try:
            self._write_shared()
        except BaseException:
            self.store.discard_if_empty()
            raise

    def _write_shared(self) -> None:
        problem = self.problem
        problem.check_context()
        costs = problem.costs
        self.store.write_shared(
            {
                "shape": problem.shape.as_array(),
                "actions": problem.actions.as_array(),
                "costs": costs.executed,
                "flops_full": costs.full,
                "weight_stats": problem.weight_stats,
                "split_windows": np.array(len(problem.split_windows)),
            }
        )


def window_builder(problem: Problem | EnvConfig, threads: int | None = None):
    """The per-window build function of a problem (its model and method are loaded once).

    Module-level so that build workers can receive it; they pass the configuration, which
    is posed as a :class:`~drrl_env.envs.problem.Problem` here.
    """
    import torch

    from drrl_env.lm.measure import loss_gradient
    from drrl_env.lm.runner import run_window

    if threads is not None:
        torch.set_num_threads(threads)
    problem = problem if isinstance(problem, Problem) else Problem(problem)
    config = problem.config
    lm, actions, method = problem.lm, problem.actions, problem.method
    tokens = problem.split_windows.tokens

    def build(window: int) -> dict[str, np.ndarray]:
        gradient = loss_gradient(lm, tokens[window])
        result = run_window(
            lm,
            tokens[window],
            config.segment_length,
            method,
            schedule=None,
            sweep=list(actions.settings),
            terms=RAW_TERMS,
            gradient=gradient,
        )
        arrays = {name: result.sweep[name] for name in RAW_TERMS}
        if not method.static_cost:
            arrays.update(flops=result.sweep["flops"], kept=result.sweep["kept"])
        return {
            "tokens": np.asarray(tokens[window], dtype=np.int64),
            **arrays,
            "spectra": result.spectra,
            "input_stats": result.input_stats,
            "nll_full": np.array(result.nll_sum),
            "mean_nll": np.array(gradient.mean_nll),
        }

    return build


@dataclass(frozen=True)
class WindowTable:
    """One window's episode as plain arrays (steps run segment-major, layer-minor).

    Attributes:
        raw: (steps, A, K) raw measurements of every action, K = the backend's ``terms``.
        spectra: (steps, d) spectra the observation shows.
        input_stats: (steps, 3) layer-input statistics.
        mean_nll: The window's mean next-token loss at exact attention.
    """

    raw: np.ndarray
    spectra: np.ndarray
    input_stats: np.ndarray
    mean_nll: float


class CachedBackend:
    """Steps are lookups in the :class:`RolloutCache` of the configuration.

    Teacher forced (every action's measurements are stored, the views do not depend on the
    actions) and replayed bit for bit (every number is a lookup of stored float64 values).
    """

    teacher_forced = True
    bitwise_replay = True

    def __init__(self, problem: Problem) -> None:
        config = problem.config
        cache = RolloutCache(problem)
        if not cache.store.has_shared():  # a complete cache may be read-only
            cache.prepare()
        shared = cache.shared()
        problem.adopt(ModelShape.from_array(shared["shape"]), shared["weight_stats"])
        self.problem = problem
        self.shape = problem.shape
        grid = ActionGrid.from_array(shared["actions"], self.shape.head_dim)
        if grid != problem.actions:
            raise ValueError(f"cache {cache.store.folder} holds another action grid")
        self.costs = problem.costs
        for name, stored, computed in (
            ("costs", shared["costs"], self.costs.executed),
            ("flops_full", shared["flops_full"], self.costs.full),
        ):
            if np.shape(stored) != computed.shape or not np.array_equal(stored, computed):
                raise ValueError(
                    f"the cached {name} of {cache.store.folder} differ from the FLOPs count of "
                    f"method {config.method!r}: a damaged cache; delete that folder to rebuild"
                )
        _ = problem.wall  # a budget below the floor of the costs is refused before building
        if cache.missing() != []:
            cache.build()
        check_finite("cached weight_stats", problem.weight_stats)
        self.n_windows = len(cache.wanted())
        self.cache = cache
        self.tokens = np.stack([cache.shard(i)["tokens"] for i in range(self.n_windows)])
        self.terms = RAW_TERMS if self.costs.static else (*RAW_TERMS, "flops", "kept")
        self._tables: OrderedDict[int, WindowTable] = OrderedDict()
        self._window, self._step = 0, 0

    def _shard(self) -> dict[str, np.ndarray]:
        """The stored arrays of the current window."""
        return self.cache.shard(self._window)

    def table(self, window: int) -> WindowTable:
        """The in-memory lookup table of ``window`` (built once; the last windows are kept).

        The whole episode's raw terms, views and reference numbers in plain arrays, so that
        a step is one row lookup whatever the store (memory maps are opened once per
        window, not per step).
        """
        if window in self._tables:
            self._tables.move_to_end(window)
            return self._tables[window]
        self._window = window
        shard = self._shard()
        steps = self.costs.full.shape[0] * self.shape.n_layers
        raw = np.stack([np.asarray(shard[name], dtype=np.float64) for name in self.terms], -1)
        spectra = np.array(shard["spectra"], dtype=np.float64)
        input_stats = np.array(shard["input_stats"], dtype=np.float64)
        check_finite(f"cached spectra of window {window}", spectra)
        check_finite(f"cached input_stats of window {window}", input_stats)
        table = WindowTable(
            raw=raw.reshape(steps, len(self.problem.actions), len(self.terms)),
            spectra=spectra.reshape(steps, -1),
            input_stats=input_stats.reshape(steps, -1),
            mean_nll=float(shard["mean_nll"]),
        )
        self._tables[window] = table
        if len(self._tables) > TABLE_WINDOWS:
            self._tables.popitem(last=False)
        return table

    def episode_views(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(spectra (steps, d), input_stats (steps, 3)) of every step of ``window``."""
        table = self.table(window)
        return table.spectra, table.input_stats

    def begin(self, window: int) -> LayerView:
        self._window, self._step = window, 0
        self._table = self.table(window)
        return self.view()

    def view(self) -> LayerView:
        return LayerView(self._table.spectra[self._step], self._table.input_stats[self._step])

    def execute(self, segment: int, layer: int, action: int) -> dict[str, float]:
        step = segment * self.shape.n_layers + layer
        self._step = step + 1
        return dict(zip(self.terms, self._table.raw[step, action].tolist(), strict=True))

    def candidates(self, segment: int, layer: int) -> dict[str, np.ndarray]:
        row = self._table.raw[segment * self.shape.n_layers + layer]  # (A, K)
        return {name: row[:, k].copy() for k, name in enumerate(self.terms)}

    def rollout(self, name: str, window: int | None = None) -> np.ndarray:
        """The cached array ``name`` of ``window``, or of every window stacked (W, ...).

        ``name`` is a per-window array of the store (:data:`SHARD_ARRAYS`, and
        :data:`OPTIONAL_SHARD_ARRAYS` for input-dependent costs), e.g. ``cosine`` (S, L, A)
        or ``spectra`` (S, L, d). Reads are verified (:meth:`RolloutCache.shard`: a corrupt
        window is rebuilt).

        Raises:
            ValueError: ``window`` is not a window of the environment (0..n_windows - 1).
            KeyError: The store holds no array ``name``.
        """
        if window is None:
            return np.stack([self._rollout_window(name, w) for w in range(self.n_windows)])
        if isinstance(window, bool) or not isinstance(window, int | np.integer):
            raise ValueError(f"window={window!r} must be an int in 0..{self.n_windows - 1}")
        if not 0 <= window < self.n_windows:
            raise ValueError(f"window={window!r} must be an int in 0..{self.n_windows - 1}")
        return self._rollout_window(name, int(window))

    def _rollout_window(self, name: str, window: int) -> np.ndarray:
        shard = self.cache.shard(window)
        if name not in shard:
            raise KeyError(f"no cached array {name!r}; the store holds {sorted(shard)}")
        return np.asarray(shard[name])

    def finish(self) -> dict:
        return {"mean_nll_full": self._table.mean_nll}

    def close(self) -> None:
        pass

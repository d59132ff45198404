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

from dataclasses import replace
from typing import Any

import numpy as np

from drrl_env.envs.actions import ActionGrid
from drrl_env.envs.backends.base import LayerView, ModelShape
from drrl_env.envs.backends.resources import (
    build_method,
    cache_root,
    cost_table,
    data_key,
    load_split_windows,
    model_shape,
    shared_model,
    weight_statistics,
)
from drrl_env.envs.budget import BudgetWall
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.observation import check_finite
from drrl_env.rewards import RAW_TERMS

CACHE_FORMAT = 4
OPEN_WINDOWS = 8
"""Windows whose memory maps a cached backend keeps open at a time."""
SHARD_ARRAYS = ("tokens", *RAW_TERMS, "spectra", "input_stats", "nll_full", "mean_nll")


def rollout_key(config: EnvConfig) -> dict[str, Any]:
    """What the rollouts of ``config`` depend on (not the reward weights, budget or term)."""
    from drrl_env.methods import method_class

    cls = method_class(config.method)
    return {
        **data_key(config),
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
    """The rollout store of one configuration (split and all).

    Args:
        config: The environment configuration.
    """

    def __init__(self, config: EnvConfig) -> None:
        from drrl_env.store import ShardStore

        self.config = config
        self.store = ShardStore(
            cache_root(config) / "rollouts",
            rollout_key(config),
            f"{config.model}-{config.method}-{config.split}",
        )

    def wanted(self) -> list[int] | None:
        """Window indices the config asks for, or None until the split's size is known."""
        if not self.store.has_shared():
            return None
        held = int(self.store.read_shared(mmap=False)["split_windows"])
        count = held if self.config.max_windows is None else min(held, self.config.max_windows)
        return list(range(count))

    def missing(self) -> list[int] | None:
        """Windows still to build (None: nothing is known yet, everything is to build)."""
        wanted = self.wanted()
        return None if wanted is None else self.store.missing(wanted)

    def build(self, workers: int = 1, progress: bool = True, threads: int | None = None) -> None:
        """Build the shared arrays and every missing window, resumably.

        Args:
            workers: Processes splitting the windows (spawned; each loads the model).
            progress: Show a progress bar.
            threads: Torch threads per worker (default: torch's own choice for one worker,
                1 for several).
        """
        from drrl_env.store_workers import build_in_workers

        self.store.check_writable()
        if not self.store.has_shared():
            self.write_shared()
        wanted = self.wanted()
        if self.store.missing(wanted):
            threads = threads if threads is not None else (None if workers == 1 else 1)
            build_in_workers(
                self.store,
                wanted,
                window_builder,
                (self.config, threads),
                workers=workers,
                progress=progress,
                desc=f"caching {self.config.model} {self.config.method} {self.config.split}",
            )

    def write_shared(self) -> None:
        """Measure and store the arrays every window shares (model shape, grid, costs)."""
        lm = shared_model(self.config.model, self.config.device, self.config.cache_dir)
        shape = model_shape(lm)
        actions = ActionGrid.from_config(self.config, shape.head_dim)
        split = replace(self.config, max_windows=None)
        costs = cost_table(build_method(self.config, shape), self.config, shape, actions)
        self.store.write_shared(
            {
                "shape": shape.as_array(),
                "actions": actions.as_array(),
                "costs": costs.executed,
                "flops_full": costs.full,
                "weight_stats": weight_statistics(lm),
                "split_windows": np.array(len(load_split_windows(split, lm.tokenizer))),
            }
        )


def window_builder(config: EnvConfig, threads: int | None = None):
    """The per-window build function of ``config`` (loads the model and method once).

    Module-level so that build workers can receive it.
    """
    import torch

    from drrl_env.lm.measure import loss_gradient
    from drrl_env.lm.runner import run_window

    if threads is not None:
        torch.set_num_threads(threads)
    lm = shared_model(config.model, config.device, config.cache_dir)
    shape = model_shape(lm)
    actions = ActionGrid.from_config(config, shape.head_dim)
    method = build_method(config, shape, lm)
    tokens = load_split_windows(replace(config, max_windows=None), lm.tokenizer)

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


class CachedBackend:
    """Steps are lookups in the :class:`RolloutCache` of the configuration."""

    def __init__(self, config: EnvConfig) -> None:
        cache = RolloutCache(config)
        if not cache.store.has_shared():
            cache.store.check_writable()
            cache.write_shared()
        shared = cache.store.read_shared(mmap=False)
        self.shape = ModelShape(*(int(x) for x in shared["shape"]))
        self.actions = ActionGrid.from_array(shared["actions"], self.shape.head_dim)
        expected = ActionGrid.from_config(config, self.shape.head_dim)
        if self.actions != expected:
            raise ValueError(f"cache {cache.store.folder} holds another action grid")
        self.costs = cost_table(build_method(config, self.shape), config, self.shape, self.actions)
        for name, stored, computed in (
            ("costs", shared["costs"], self.costs.executed),
            ("flops_full", shared["flops_full"], self.costs.full),
        ):
            if np.shape(stored) != computed.shape or not np.array_equal(stored, computed):
                raise ValueError(
                    f"the cached {name} of {cache.store.folder} differ from the FLOPs count of "
                    f"method {config.method!r}: a damaged cache; delete that folder to rebuild"
                )
        if config.budget is not None:
            # The floor follows from the cost table: refuse before building any rollout.
            BudgetWall(self.costs, self.shape.n_layers, config.budget)
        if cache.missing() != []:
            cache.build()
        self.weight_stats = np.asarray(shared["weight_stats"])
        check_finite("cached weight_stats", self.weight_stats)
        self.n_windows = len(cache.wanted())
        self.cache = cache
        self.tokens = np.stack([cache.store.read_shard(i)["tokens"] for i in range(self.n_windows)])
        self.terms = RAW_TERMS if self.costs.static else (*RAW_TERMS, "flops", "kept")
        self._loaded: dict[int, dict[str, np.ndarray]] = {}
        self._window, self._next = 0, (0, 0)

    def _shard(self) -> dict[str, np.ndarray]:
        """The memory-mapped arrays of the current window (a few windows kept open)."""
        if self._window not in self._loaded:
            if len(self._loaded) >= OPEN_WINDOWS:
                self._loaded.pop(next(iter(self._loaded)))
            shard = self.cache.store.read_shard(self._window)
            for name in ("spectra", "input_stats"):
                check_finite(f"cached {name} of window {self._window}", shard[name])
            self._loaded[self._window] = shard
        return self._loaded[self._window]

    def begin(self, window: int) -> LayerView:
        self._window, self._next = window, (0, 0)
        return self.view()

    def view(self) -> LayerView:
        segment, layer = self._next
        shard = self._shard()
        return LayerView(
            np.asarray(shard["spectra"][segment, layer]),
            np.asarray(shard["input_stats"][segment, layer]),
        )

    def execute(self, segment: int, layer: int, action: int) -> dict[str, float]:
        shard = self._shard()
        raw = {name: float(shard[name][segment, layer, action]) for name in self.terms}
        self._next = (
            segment + (layer + 1) // self.shape.n_layers,
            (layer + 1) % self.shape.n_layers,
        )
        return raw

    def candidates(self, segment: int, layer: int) -> dict[str, np.ndarray]:
        shard = self._shard()
        return {name: np.asarray(shard[name][segment, layer]) for name in self.terms}

    def finish(self) -> dict:
        shard = self._shard()
        return {"mean_nll_full": float(shard["mean_nll"])}

    def close(self) -> None:
        pass

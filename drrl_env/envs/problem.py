"""The problem an :class:`~drrl_env.envs.config.EnvConfig` poses, built once.

A :class:`Problem` holds everything the configuration determines before any episode runs:
the model, its attention shape, the action grid, the attention method, the FLOPs of every
action (:class:`~drrl_env.envs.backends.base.CostTable`), the windows, the weight
statistics, the reward and the budget wall. The environment builds one and hands it to its
backend, and a rollout build uses the same one, so each of these is computed in one place.

Every part is computed on first use. A complete rollout cache therefore serves an
environment without loading the model: the cached backend hands the stored shape and
weight statistics to the problem (:meth:`Problem.adopt`), and the FLOPs are counted from the
shape alone.

Everything stored is keyed on what it depends on (:meth:`Problem.data_key`): the model's
weights and tokenizer (:func:`drrl_env.lm.models.model_fingerprint`, full-content hashes of
its weight, config and tokenizer files), the text's content
(:func:`drrl_env.data.source_fingerprint`) and the configuration fields that change numbers.
Overwriting a model folder or a corpus file changes the key, so a stale cache is never
served.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from drrl_env.envs.actions import ActionGrid
from drrl_env.envs.backends.base import CostTable
from drrl_env.envs.budget import BudgetWall
from drrl_env.envs.config import EnvConfig
from drrl_env.lm.facts import ModelShape, max_positions, model_shape, shared_model
from drrl_env.lm.facts import weight_statistics as measure_weight_statistics
from drrl_env.paths import cache_dir as default_cache_dir
from drrl_env.rewards import Reward, fidelity_term

if TYPE_CHECKING:
    from drrl_env.data import WindowSet

CALIBRATION_WINDOWS = 8
"""Train windows the calibrated bases are estimated on."""


class Problem:
    """What ``config`` determines, computed once, each part on first use.

    Args:
        config: The environment configuration.

    Attributes:
        config: The configuration.
    """

    def __init__(self, config: EnvConfig) -> None:
        if not isinstance(config, EnvConfig):
            raise TypeError(f"a Problem is built from an EnvConfig, not {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"Problem({self.config.model!r}, method={self.config.method!r})"

    # -- the model -------------------------------------------------------------------------

    @property
    def cache_root(self) -> Path:
        """The cache root: ``config.cache_dir`` or the default."""
        folder = self.config.cache_dir
        return Path(folder).expanduser() if folder else default_cache_dir()

    @cached_property
    def lm(self):
        """The loaded model (shared by the problems of a process, see ``shared_model``)."""
        config = self.config
        return shared_model(config.model, config.device, config.cache_dir)

    @cached_property
    def shape(self) -> ModelShape:
        """The model's attention shape."""
        return model_shape(self.lm)

    @cached_property
    def weight_stats(self) -> np.ndarray:
        """(L, 3) projection-weight statistics of each layer (observation ``w_t``)."""
        return measure_weight_statistics(self.lm)

    def adopt(self, shape: ModelShape, weight_stats: np.ndarray) -> None:
        """Take the shape and weight statistics stored with a rollout cache.

        Raises:
            ValueError: The problem already measured other values.
        """
        for name, value in (("shape", shape), ("weight_stats", np.asarray(weight_stats))):
            if name not in self.__dict__:
                self.__dict__[name] = value
                continue
            held = self.__dict__[name]
            same = held == value if name == "shape" else np.array_equal(held, value)
            if not same:
                raise ValueError(f"the stored {name} differs from the model's")

    def check_context(self) -> None:
        """Raise ValueError when a window is longer than the model's context."""
        positions = max_positions(self.lm)
        if positions is not None and self.config.seq_len > positions:
            raise ValueError(
                f"seq_len={self.config.seq_len} is longer than the context of "
                f"{self.config.model} ({positions} tokens)"
            )

    # -- actions, method, costs ------------------------------------------------------------

    @cached_property
    def actions(self) -> ActionGrid:
        """The action grid at the model's head dimension."""
        return ActionGrid.from_config(self.config, self.shape.head_dim)

    @cached_property
    def method(self):
        """The attention method, with its calibrated bases when it needs them (loads the
        model then)."""
        from drrl_env.methods import make_method, method_class

        cls = method_class(self.config.method)
        kwargs: dict[str, Any] = {}
        if cls.needs_basis:
            kwargs["basis"] = self.calibrated_basis(cls.scope)
        return make_method(self.config.method, self.shape.head_dim, self.shape.n_layers, **kwargs)

    @cached_property
    def counting_method(self):
        """The attention method built for FLOPs counting only (no bases, no model)."""
        from drrl_env.methods import make_method

        return make_method(self.config.method, self.shape.head_dim, self.shape.n_layers)

    @cached_property
    def costs(self) -> CostTable:
        """FLOPs of one layer call at every segment and action (queries over the KV cache).

        For a method with input-dependent costs these are its upper bounds (see
        :class:`~drrl_env.envs.backends.base.CostTable`).
        """
        from drrl_env.methods.base import CallShape, exact_flops

        config, shape, method = self.config, self.shape, self.counting_method
        t, segments, actions = config.segment_length, config.n_segments, self.actions
        executed = np.zeros((segments, len(actions)))
        kept = np.zeros((segments, len(actions)))
        full = np.zeros(segments)
        for segment in range(segments):
            call = CallShape(
                t, (segment + 1) * t, shape.head_dim, shape.n_heads, shape.n_kv_heads, new_keys=t
            )
            full[segment] = exact_flops(call).total
            for index, setting in enumerate(actions.settings):
                executed[segment, index] = method.flops(call, setting).total
                kept[segment, index] = method.kept_total(call, setting) / call.causal_total
        return CostTable(executed, full, kept, method.static_cost)

    @property
    def n_layers(self) -> int:
        return self.shape.n_layers

    @property
    def steps(self) -> int:
        """Steps of an episode: one per (segment, layer)."""
        return self.shape.n_layers * self.config.n_segments

    # -- reward and budget -----------------------------------------------------------------

    @cached_property
    def reward(self) -> Reward:
        """The reward: the configured fidelity term, weights and units."""
        config = self.config
        term = fidelity_term(config.fidelity)
        return Reward(term, config.weights, self.steps, config.damage_scale)

    @cached_property
    def wall(self) -> BudgetWall | None:
        """The budget wall, or None without a budget.

        Raises:
            ValueError: The budget is below the cheapest schedule (from the costs alone, so
                before any rollout is built).
        """
        if self.config.budget is None:
            return None
        return BudgetWall(self.costs, self.shape.n_layers, self.config.budget)

    # -- text ------------------------------------------------------------------------------

    @cached_property
    def windows(self) -> WindowSet:
        """The configured split's windows (at most ``max_windows``) with their metadata."""
        return self._window_set(self.config)

    @cached_property
    def split_windows(self) -> WindowSet:
        """Every window of the configured split (``max_windows`` ignored)."""
        return self._window_set(replace(self.config, max_windows=None))

    def _window_set(self, config: EnvConfig) -> WindowSet:
        from drrl_env.data import load_windows

        return load_windows(
            self.lm.tokenizer,
            config.seq_len,
            split=config.split,
            corpus=config.corpus,
            data_path=config.data_path,
            eval_fraction=config.eval_fraction,
            max_windows=config.max_windows,
            text_field=config.text_field,
            cache_dir=self.cache_root,
        )

    # -- what stored results are keyed on --------------------------------------------------

    def data_key(self) -> dict[str, Any]:
        """The identity of the model and text the configuration reads, for cache keys."""
        from drrl_env.data import source_fingerprint
        from drrl_env.lm.models import model_fingerprint

        config = self.config
        return {
            "model": config.model,
            "model_fingerprint": model_fingerprint(config.model),
            "corpus": config.corpus,
            "source": source_fingerprint(config.corpus, config.data_path, config.text_field),
            "seq_len": config.seq_len,
            "segment_length": config.segment_length,
            "eval_fraction": config.eval_fraction,
        }

    def calibrated_basis(self, scope: str):
        """The calibrated bases of the model for ``scope``, estimated on train windows.

        Stored atomically under the cache root, keyed on the model's and the text's
        fingerprints; estimated once.
        """
        import torch

        from drrl_env.lm.calibration import calibrate_basis
        from drrl_env.store import ShardStore

        config = self.config
        key = {**self.data_key(), "scope": scope, "windows": CALIBRATION_WINDOWS, "format": 4}
        store = ShardStore(self.cache_root / "bases", key, f"{config.model}-{scope}")
        if store.has_shared():
            return torch.from_numpy(np.array(store.read_shared(mmap=False)["basis"]))
        store.check_writable()
        train = replace(config, split="train", max_windows=CALIBRATION_WINDOWS)
        windows = self._window_set(train).tokens
        basis = calibrate_basis(self.lm, windows, config.segment_length, scope=scope)
        store.write_shared({"basis": basis.numpy()})
        return basis

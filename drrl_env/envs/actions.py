"""The action grid: what each index of ``Discrete(n)`` executes.

Dense methods: one action per candidate rank, the last being full rank (exact attention).
Sparse methods (``topk``): one action per (rank, keep) pair of the non-full ranks and the
keep fractions, flattened rank-major, then one last action for exact attention::

    ranks (8, 16, ..., 64), keeps (0.25, 0.5)
    -> (8, 0.25), (8, 0.5), (16, 0.25), ..., (56, 0.5), (64, 1.0)

A method that selects keys (``topp``) also offers selection at full rank (exact scores
choose the keys: the upper bound of its selection), ``(d, p)`` for every ``p < 1``.

The last action is always exact attention: the guardrail never masks it and the baselines'
"full rank" is it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drrl_env.envs.config import EnvConfig
from drrl_env.methods.base import Setting


@dataclass(frozen=True)
class ActionGrid:
    """The settings the actions execute, in action order."""

    settings: tuple[Setting, ...]
    head_dim: int

    @classmethod
    def from_config(cls, config: EnvConfig, head_dim: int) -> ActionGrid:
        """The grid of ``config``'s ranks (checked against ``head_dim``) and keep fractions."""
        from drrl_env.methods import method_class

        ranks = config.rank_grid(head_dim)
        keeps = config.sparse_keeps
        selecting = ranks if method_class(config.method).selects_at_full_rank else ranks[:-1]
        settings = [
            Setting(r, k) for r in selecting for k in keeps if not Setting(r, k).is_exact(head_dim)
        ]
        if keeps == (1.0,):
            settings = [Setting(r) for r in ranks[:-1]]
        return cls((*settings, Setting(head_dim)), head_dim)

    @classmethod
    def from_array(cls, array: np.ndarray, head_dim: int) -> ActionGrid:
        """The grid stored as an (A, 2) array of [rank, keep] rows."""
        return cls(tuple(Setting(int(r), float(k)) for r, k in np.asarray(array)), head_dim)

    def as_array(self) -> np.ndarray:
        """(A, 2) float64 [rank, keep] rows."""
        return np.array([[s.rank, s.keep] for s in self.settings], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.settings)

    @cached_property
    def ranks(self) -> np.ndarray:
        """(A,) rank of each action."""
        return np.array([s.rank for s in self.settings], dtype=np.int64)

    @cached_property
    def keeps(self) -> np.ndarray:
        """(A,) keep fraction of each action."""
        return np.array([s.keep for s in self.settings], dtype=np.float64)

    @property
    def full_action(self) -> int:
        """Index of the exact-attention action (the last)."""
        return len(self.settings) - 1

    def labels(self) -> list[str]:
        """Short names of the actions (``r16``, ``r16k0.5``)."""
        return [s.label() for s in self.settings]

    def index(self, setting: Setting | int) -> int:
        """The action of ``setting`` (an int means that rank at the grid's only keep)."""
        if not isinstance(setting, Setting):
            matches = [i for i, s in enumerate(self.settings) if s.rank == setting]
            if len(matches) != 1:
                raise ValueError(
                    f"rank {setting!r} names {len(matches)} actions of the grid "
                    f"{self.labels()}; pass a Setting(rank, keep)"
                )
            return matches[0]
        if setting not in self.settings:
            raise ValueError(f"{setting} is not an action of the grid {self.labels()}")
        return self.settings.index(setting)

"""Facts of a loaded model that environments read: its attention shape and weight statistics.

:func:`shared_model` loads one model per (name, device, cache folder) in a process, so that
several environments and a rollout build share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def as_array(self) -> np.ndarray:
        return np.array([self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim])

    @classmethod
    def from_array(cls, array) -> ModelShape:
        """The shape :meth:`as_array` wrote."""
        return cls(*(int(x) for x in np.asarray(array).tolist()))


@lru_cache(maxsize=4)
def shared_model(name: str, device: str, cache_dir: str | None):
    """One loaded model per (name, device, cache folder) in a process."""
    from drrl_env.lm.models import load_model

    return load_model(name, device=device, cache_dir=cache_dir)


def model_shape(lm) -> ModelShape:
    """The attention shape of a loaded model."""
    return ModelShape(lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim)


def max_positions(lm) -> int | None:
    """The longest context ``lm`` was trained for, or None when the model does not say."""
    try:
        return int(lm.max_positions)
    except (AttributeError, TypeError, ValueError):
        return None


def weight_statistics(lm) -> np.ndarray:
    """Per layer ``w_t`` (L, 3): RMS, stable rank and relative RMS of the attention weights."""
    from drrl_env.lm.attention import attention_modules

    rows = []
    for module in attention_modules(lm.model):
        matrices = [p.detach().double() for p in module.parameters() if p.ndim == 2]
        rms = float(np.mean([m.pow(2).mean().sqrt().item() for m in matrices]))
        largest = max(matrices, key=lambda m: m.numel())
        singular = np.linalg.svd(largest.cpu().numpy(), compute_uv=False)
        stable_rank = float((singular**2).sum() / singular[0] ** 2) / min(largest.shape)
        rows.append([rms, stable_rank])
    table = np.array(rows)
    relative = table[:, 0] / table[:, 0].max()
    return np.column_stack([table[:, 0] / (1 + table[:, 0]), table[:, 1], relative])

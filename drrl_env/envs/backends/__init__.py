"""Backends of the dynamic-rank environment behind one Protocol (:class:`Backend`)."""

from __future__ import annotations

from drrl_env.envs.backends.base import Backend, CostTable, LayerView, ModelShape
from drrl_env.envs.config import EnvConfig

__all__ = ["Backend", "CostTable", "LayerView", "ModelShape", "make_backend"]


def make_backend(config: EnvConfig) -> Backend:
    """The backend ``config.backend`` names, built for ``config``."""
    if config.backend == "cached":
        from drrl_env.envs.backends.cached import CachedBackend

        return CachedBackend(config)
    from drrl_env.envs.backends.live import LiveBackend

    return LiveBackend(config)

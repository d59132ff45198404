"""Backends of the dynamic-rank environment behind one Protocol (:class:`Backend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drrl_env.envs.backends.base import Backend, CostTable, LayerView, ModelShape

if TYPE_CHECKING:
    from drrl_env.envs.problem import Problem

__all__ = ["Backend", "CostTable", "LayerView", "ModelShape", "make_backend"]


def make_backend(problem: Problem) -> Backend:
    """The backend ``problem.config.backend`` names, built for ``problem``."""
    if problem.config.backend == "cached":
        from drrl_env.envs.backends.cached import CachedBackend

        return CachedBackend(problem)
    from drrl_env.envs.backends.live import LiveBackend

    return LiveBackend(problem)

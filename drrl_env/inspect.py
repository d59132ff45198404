"""Per-layer views of cached rollouts, and the attention shape of a registered id.

What the notebooks plot, computed here once: the mean fidelity of every candidate rank at
every layer, each layer's mean spectrum and the energy it retains at each rank, the smallest
rank reaching a fidelity target, and the attention shape of an environment without building
its rollouts::

    import gymnasium as gym
    import drrl_env
    from drrl_env.inspect import layer_fidelity

    env = gym.make("DRRL-Tiny-v0")
    table = layer_fidelity(env.unwrapped)  # (layers, actions)

The per-layer views take a cached environment (``env.unwrapped``) or its backend: anything
with ``rollout(name)`` (teacher-forced backends only) and ``actions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from drrl_env.envs.config import EnvConfig
from drrl_env.lm.facts import ModelShape, model_shape, shared_model
from drrl_env.spectra import normalize_spectrum


def env_config(env_id: str, **overrides: Any) -> EnvConfig:
    """The :class:`EnvConfig` that ``gym.make(env_id, **overrides)`` would build.

    Raises:
        ValueError: ``env_id`` is not one of the registered dynamic-rank ids.
    """
    from drrl_env import ENV_IDS

    if env_id not in ENV_IDS:
        raise ValueError(f"unknown id {env_id!r}; registered: {', '.join(ENV_IDS)}")
    return EnvConfig(**{**ENV_IDS[env_id], **overrides})


def attention_shape(env_id: str, **overrides: Any) -> tuple[EnvConfig, ModelShape]:
    """The configuration of ``env_id`` and its model's attention shape.

    Loads the frozen model (shared with environments of the same process) but builds no
    rollouts, so it is cheap even for the SmolLM2 ids.
    """
    config = env_config(env_id, **overrides)
    lm = shared_model(config.model, config.device, config.cache_dir)
    return config, model_shape(lm)


def rollout_array(backend, name: str) -> np.ndarray:
    """The cached array ``name`` of every window of a cached backend, stacked (W, ...).

    ``backend`` is a teacher-forced backend or an environment (``env.unwrapped``): its
    ``rollout(name)``, whose reads are verified (a corrupt window is rebuilt).
    """
    return backend.rollout(name)


def layer_fidelity(backend, term: str = "cosine") -> np.ndarray:
    """Mean teacher-forced ``term`` of each action at each layer, shape (L, A).

    The mean runs over windows and segments of the cached (W, S, L, A) array.
    """
    return rollout_array(backend, term).astype(np.float64).mean(axis=(0, 1))


def layer_spectra(backend) -> np.ndarray:
    """Each layer's spectrum, averaged and normalised, in truncation order, shape (L, d)."""
    mean = rollout_array(backend, "spectra").mean(axis=(0, 1))  # (L, d)
    return mean / mean.sum(axis=-1, keepdims=True)


def layer_energy(backend) -> np.ndarray:
    """Mean energy retained at each action's rank at each layer, shape (L, A)."""
    spectra = rollout_array(backend, "spectra")  # (W, S, L, d)
    zeros = np.zeros((*spectra.shape[:-1], 1))
    cumulative = np.concatenate([zeros, np.cumsum(spectra, axis=-1)], axis=-1)
    return cumulative[..., backend.problem.actions.ranks].mean(axis=(0, 1))


def effective_rank(spectrum: Any) -> np.ndarray | float:
    """``exp`` of the Shannon entropy of the normalised spectrum (last axis).

    ``d`` for a flat spectrum of ``d`` values, 1 when all energy is in one direction: how
    many directions the layer's queries and keys really use.
    """
    p = normalize_spectrum(spectrum)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    out = np.exp(entropy)
    return float(out) if out.ndim == 0 else out


def smallest_rank_reaching(table: np.ndarray, ranks: Sequence[int], threshold: float) -> np.ndarray:
    """Per row of ``table`` (L, K), the smallest rank whose value is ``>= threshold``.

    Rows that never reach it get the last (full) rank.

    Raises:
        ValueError: ``table`` does not have one column per rank.
    """
    values = np.asarray(table, dtype=np.float64)
    grid = np.asarray(ranks)
    if values.ndim != 2 or values.shape[1] != grid.size:
        raise ValueError(f"table of shape {values.shape} needs {grid.size} columns (one per rank)")
    reached = values >= threshold
    first = np.where(reached.any(axis=1), reached.argmax(axis=1), grid.size - 1)
    return grid[first]

"""Reward terms as objects: a name, a documented range, and how a raw measurement becomes it.

The environment's reward is a weighted sum of terms (:class:`~drrl_env.rewards.Reward`):

==================  ====================================================  =================
term                value per step                                        range
==================  ====================================================  =================
``cosine``          mean cosine of the layer's executed vs exact           [-1, 1], 1 exact
                    attention output on the segment (DR-RL paper)
``loss``            ``1 - steps * dnll_taylor``: first-order estimate of   (-inf, inf),
                    the change of the window's mean next-token loss that   1 exact
                    this cell's approximation causes, scaled so that the
                    episode mean is ``1 - estimated change of log ppl``
``loss-fisher``     ``1 - steps * dnll_fisher``: the same scaled from a    (-inf, 1], 1 exact
                    second-order (Gauss-Newton) estimate, never above 1
``flops``           executed attention FLOPs over exact FLOPs of the       [0, ~2.5]
                    same call (features and basis search included)
``perturbation``    sqrt of the normalised spectral energy between the     [0, 1]
                    layer's previous and new rank (DR-RL paper, Eq. 8)
==================  ====================================================  =================

The first three are *fidelity* terms (``gym.make(..., fidelity=name)`` picks one; a new
one is a :class:`RewardTerm` with a ``transform`` plus one :func:`register_fidelity_term`
call); the
loss-aware ones use the gradient of the window's loss at exact attention (one backward
pass per window, :func:`drrl_env.lm.measure.loss_gradient`), so the cached backend stores
them like the cosine. ``steps`` is the episode length (segments x layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RAW_TERMS = ("cosine", "dnll_taylor", "dnll_fisher")
"""Raw per-step measurements the backends provide (:data:`drrl_env.lm.measure.TERMS`)."""


def _identity(raw, steps: int):
    return raw


def _one_minus_steps_times(raw, steps: int):
    return 1.0 - steps * raw


@dataclass(frozen=True)
class RewardTerm:
    """One reward term: it computes itself from a raw measurement.

    Attributes:
        name: The term's name (``info`` key ``term_<name>``).
        low, high: Documented range of :meth:`value`.
        description: What it measures.
        raw: The raw measurement it reads, one of :data:`RAW_TERMS` (None for the FLOPs and
            perturbation terms, which the environment computes itself).
        transform: ``transform(raw, steps)``, the term's value from the raw measurement and
            the episode length; numbers and arrays alike (identity by default).
    """

    name: str
    low: float
    high: float
    description: str
    raw: str | None = None
    transform: Callable = _identity

    def value(self, raw, steps: int):
        """The term's value for raw measurement(s) ``raw``: a float for a number, an array
        for an array (every action at a step, every cell of a rollout)."""
        if np.ndim(raw) == 0:
            return float(self.transform(float(raw), steps))
        return self.transform(np.asarray(raw, dtype=np.float64), steps)


FIDELITY_TERMS: dict[str, RewardTerm] = {}
"""Fidelity terms by name: ``gym.make(..., fidelity=name)``."""


def register_fidelity_term(term: RewardTerm) -> RewardTerm:
    """Register a fidelity term (``gym.make(..., fidelity=term.name)`` then uses it).

    The term reads one of the raw measurements every backend provides (:data:`RAW_TERMS`),
    so no cache is rebuilt; its ``transform`` turns it into the term's value.

    Raises:
        ValueError: The name is taken, or ``term.raw`` is not a raw measurement.
    """
    if term.name in FIDELITY_TERMS:
        raise ValueError(f"fidelity term {term.name!r} is already registered")
    if term.raw not in RAW_TERMS:
        raise ValueError(
            f"fidelity term {term.name!r} reads raw={term.raw!r}; raw measurements: "
            f"{', '.join(RAW_TERMS)}"
        )
    FIDELITY_TERMS[term.name] = term
    return term


register_fidelity_term(
    RewardTerm("cosine", -1.0, 1.0, "cosine of executed vs exact attention output", "cosine")
)
register_fidelity_term(
    RewardTerm(
        "loss",
        -math.inf,
        math.inf,
        "1 - steps x first-order estimate of the loss change this cell causes",
        "dnll_taylor",
        _one_minus_steps_times,
    )
)
register_fidelity_term(
    RewardTerm(
        "loss-fisher",
        -math.inf,
        1.0,
        "1 - steps x second-order estimate of the loss change this cell causes",
        "dnll_fisher",
        _one_minus_steps_times,
    )
)

FLOPS_TERM = RewardTerm("flops", 0.0, 2.5, "executed over exact attention FLOPs of the call")
PERTURBATION_TERM = RewardTerm(
    "perturbation", 0.0, 1.0, "normalised spectral energy between the previous and new rank"
)


def fidelity_term(name: str) -> RewardTerm:
    """The fidelity term ``name``; ValueError listing the terms if unknown."""
    if name not in FIDELITY_TERMS:
        raise ValueError(
            f"fidelity={name!r} is not a fidelity term; terms: {', '.join(FIDELITY_TERMS)}"
        )
    return FIDELITY_TERMS[name]

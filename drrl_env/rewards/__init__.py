"""The reward of the dynamic-rank environment: terms as objects and their weighted sum.

Unbudgeted episodes::

    reward = alpha * fidelity - beta * flops - gamma * perturbation

Budgeted episodes (``budget=``, a cap on the episode's executed attention FLOPs enforced by
the action wall) reward the fidelity term alone: the budget replaces ``beta`` and ``gamma``.
Every weighted term and every raw number goes into ``info`` (see :mod:`.terms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drrl_env.rewards.terms import (
    FIDELITY_TERMS,
    FLOPS_TERM,
    PERTURBATION_TERM,
    RAW_TERMS,
    RewardTerm,
    fidelity_term,
)

__all__ = [
    "FIDELITY_TERMS",
    "FLOPS_TERM",
    "PERTURBATION_TERM",
    "RAW_TERMS",
    "Reward",
    "RewardTerm",
    "RewardWeights",
    "fidelity_term",
]


def check_weight(name: str, value: object) -> float:
    """``value`` as float, or ValueError unless it is a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the three reward terms.

    The defaults make the per-step problem non-trivial on WikiText with SmolLM2: the
    best greedy policy is neither full rank nor any single static rank (see README).
    """

    alpha: float = 1.0
    """Weight of the fidelity term."""
    beta: float = 0.5
    """Weight of the executed-FLOPs ratio."""
    gamma: float = 0.1
    """Weight of the rank-change perturbation."""

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            object.__setattr__(self, name, check_weight(name, getattr(self, name)))


@dataclass(frozen=True)
class Reward:
    """The weighted sum of a fidelity term, the FLOPs term and the perturbation term.

    Args:
        fidelity: The fidelity term.
        weights: Its weight ``alpha`` and those of the FLOPs and perturbation terms.
        steps: Episode length (scales the loss-aware terms).
    """

    fidelity: RewardTerm
    weights: RewardWeights
    steps: int

    def components(
        self, raw: dict[str, float], flops_ratio: float, perturbation: float
    ) -> dict[str, float]:
        """Term values, weighted terms (signed as they enter the reward) and their sum."""
        fidelity = self.fidelity.value(raw[self.fidelity.raw], self.steps)
        terms = {
            "fidelity": fidelity,
            "reward_fidelity": self.weights.alpha * fidelity,
            "reward_flops": -self.weights.beta * flops_ratio,
            "reward_perturbation": -self.weights.gamma * perturbation,
        }
        terms["reward"] = (
            terms["reward_fidelity"] + terms["reward_flops"] + terms["reward_perturbation"]
        )
        return terms

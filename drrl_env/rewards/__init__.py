"""The reward of the dynamic-rank environment: terms as objects and their weighted sum.

Unbudgeted episodes::

    reward = alpha * fidelity - beta * flops - gamma * perturbation

Budgeted episodes (``budget=``, a cap on the episode's executed attention FLOPs enforced by
the action wall) reward the fidelity term alone: the budget replaces ``beta`` and ``gamma``.
Every weighted term and every raw number goes into ``info`` (see :mod:`.terms`).

Damage units (``damage_scale=s``): the fidelity term enters as ``-s * (1 - fidelity)``
instead of ``fidelity``, so exact attention scores 0 and every approximation a loss. The
ranking of policies is unchanged (a constant offset and a scale per step), but a policy
gradient sees returns whose spread across policies is of order 1 instead of a few
hundredths out of about 120 (see :data:`DAMAGE_SCALE`).
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
    register_fidelity_term,
)

__all__ = [
    "DAMAGE_SCALE",
    "FIDELITY_TERMS",
    "FLOPS_TERM",
    "PERTURBATION_TERM",
    "RAW_TERMS",
    "Reward",
    "RewardTerm",
    "RewardWeights",
    "fidelity_term",
    "register_fidelity_term",
]


DAMAGE_SCALE = 10.0
"""The damage scale the ``*-Damage-*`` ids use. Measured on the cached train windows of
``DRRL-Mix-TopP-v0`` (12 windows, 120 cells each, cosine term): an episode's summed
``1 - cosine`` is 0.115 for the best uniform action and 0.018 for the static per-layer
allocation at budget 0.6, 0.248 and 0.126 at budget 0.45; times 10 the gap between the two
is 1.0 and 1.2 return units."""


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
        damage_scale: None for the paper's reward; a number ``s`` puts the fidelity term in
            damage units, ``-s * (1 - fidelity)`` (see the module docstring).
    """

    fidelity: RewardTerm
    weights: RewardWeights
    steps: int
    damage_scale: float | None = None

    def __post_init__(self) -> None:
        if self.damage_scale is not None:
            object.__setattr__(
                self, "damage_scale", check_weight("damage_scale", self.damage_scale)
            )

    def fidelity_reward(self, fidelity):
        """The weighted fidelity term as it enters the reward (a number or an array)."""
        if self.damage_scale is None:
            return self.weights.alpha * fidelity
        return -self.weights.alpha * self.damage_scale * (1.0 - fidelity)

    def combine(self, fidelity, flops_ratio, perturbation):
        """The reward of fidelity-term values, FLOPs ratios and perturbations (numbers or
        arrays that broadcast): the one place the formula is written."""
        return (
            self.fidelity_reward(fidelity)
            - self.weights.beta * flops_ratio
            - self.weights.gamma * perturbation
        )

    def components(
        self, raw: dict[str, float], flops_ratio: float, perturbation: float
    ) -> dict[str, float]:
        """Term values, weighted terms (signed as they enter the reward) and their sum."""
        fidelity = self.fidelity.value(raw[self.fidelity.raw], self.steps)
        terms = {
            "fidelity": fidelity,
            "reward_fidelity": self.fidelity_reward(fidelity),
            "reward_flops": -self.weights.beta * flops_ratio,
            "reward_perturbation": -self.weights.gamma * perturbation,
        }
        terms["reward"] = (
            terms["reward_fidelity"] + terms["reward_flops"] + terms["reward_perturbation"]
        )
        return terms

"""The reward of the dynamic-rank environment and its components.

``reward = alpha * fidelity - beta * flops_ratio - gamma * perturbation``

=============  ==========================================================  ===========
component      meaning                                                     range
=============  ==========================================================  ===========
fidelity       mean cosine of low-rank vs full-rank attention output        [-1, 1]
               of the layer on the segment (1 at full rank)
flops_ratio    executed attention FLOPs (basis search included) over the    [0, ~2]
               FLOPs of full-rank attention on the same shapes
perturbation   sqrt of the normalised spectral energy between the layer's   [0, 1]
               previous rank and the new one (DR-RL paper, Eq. 8)
=============  ==========================================================  ===========

A low rank can execute *more* FLOPs than full attention (the basis search and the
projections are not free), so ``flops_ratio`` may exceed 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the three reward terms.

    The defaults make the per-step problem non-trivial on WikiText with SmolLM2: the
    best greedy policy is neither full rank nor any single static rank (see README).
    """

    alpha: float = 1.0
    """Weight of attention fidelity."""
    beta: float = 0.5
    """Weight of the executed-FLOPs ratio."""
    gamma: float = 0.1
    """Weight of the rank-change perturbation."""

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or value != value:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    def components(
        self, fidelity: float, flops_ratio: float, perturbation: float
    ) -> dict[str, float]:
        """The weighted terms (signed as they enter the reward) and their sum."""
        terms = {
            "reward_fidelity": self.alpha * fidelity,
            "reward_flops": -self.beta * flops_ratio,
            "reward_perturbation": -self.gamma * perturbation,
        }
        terms["reward"] = sum(terms.values())
        return terms

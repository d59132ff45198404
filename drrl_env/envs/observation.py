"""The observation of the dynamic-rank environment: one flat, bounded float32 vector.

:class:`ObservationLayout` is the single description of that vector: the environment
writes it, the Transformer policy reads it (its state tokens follow the groups here).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drrl_env.lm.attention import INPUT_STAT_NAMES

WEIGHT_STAT_NAMES = ("weight_rms", "weight_stable_rank", "weight_rms_relative")
MAX_FLOPS_RATIO = 4.0


@dataclass(frozen=True)
class Feature:
    """A named group of consecutive observation entries."""

    name: str
    size: int
    low: float
    high: float
    description: str
    per_rank: bool = False  # one entry per candidate rank


@dataclass(frozen=True)
class ObservationLayout:
    """Feature table of the observation for a grid of ``n_ranks`` candidate ranks."""

    n_ranks: int

    @cached_property
    def features(self) -> tuple[Feature, ...]:
        k = self.n_ranks
        return (
            Feature("layer", 1, 0, 1, "layer index / (layers - 1)"),
            Feature("segment", 1, 0, 1, "segment index / (segments - 1)"),
            Feature("prev_rank_layer", 1, 0, 1, "this layer's rank on the previous segment / d"),
            Feature("prev_rank_step", 1, 0, 1, "rank chosen at the previous layer / d"),
            Feature("energy", k, 0, 1, "energy retained at each candidate rank", True),
            Feature("perturbation", k, 0, 1, "perturbation of moving to each candidate", True),
            Feature(
                "sequence_dynamics",
                3,
                -1,
                1,
                "layer-input statistics h_t: " + ", ".join(INPUT_STAT_NAMES),
            ),
            Feature(
                "layer_weights",
                3,
                0,
                1,
                "projection-weight statistics w_t: " + ", ".join(WEIGHT_STAT_NAMES),
            ),
            Feature(
                "flops_spent",
                1,
                0,
                MAX_FLOPS_RATIO,
                "executed / full-rank attention FLOPs so far in the episode",
            ),
        )

    @cached_property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for feature in self.features:
            out[feature.name] = slice(start, start + feature.size)
            start += feature.size
        return out

    @property
    def size(self) -> int:
        return sum(f.size for f in self.features)

    @cached_property
    def low(self) -> np.ndarray:
        return np.concatenate([np.full(f.size, f.low, np.float32) for f in self.features])

    @cached_property
    def high(self) -> np.ndarray:
        return np.concatenate([np.full(f.size, f.high, np.float32) for f in self.features])

    def table(self) -> str:
        """The feature table as Markdown (index, feature, min, max, description)."""
        rows = ["| index | feature | min | max | description |", "|---|---|---|---|---|"]
        for feature in self.features:
            part = self.slices[feature.name]
            index = f"{part.start}" if feature.size == 1 else f"{part.start}-{part.stop - 1}"
            rows.append(
                f"| {index} | {feature.name} | {feature.low:g} | {feature.high:g} | "
                f"{feature.description} |"
            )
        return "\n".join(rows)

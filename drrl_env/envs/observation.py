"""The observation of the dynamic-rank environment: one flat, bounded float32 vector.

:class:`ObservationLayout` is the single description of that vector and
:class:`ObservationBuilder` the single place that writes it; the Transformer policy reads
the same layout (its state tokens follow the groups here).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drrl_env.lm import INPUT_STAT_NAMES

WEIGHT_STAT_NAMES = ("weight_rms", "weight_stable_rank", "weight_rms_relative")
MAX_FLOPS_RATIO = 4.0
"""Upper bound of the FLOPs features (an action may execute more than exact attention)."""


@dataclass(frozen=True)
class Feature:
    """A named group of consecutive observation entries."""

    name: str
    size: int
    low: float
    high: float
    description: str
    per_action: bool = False  # one entry per action

    @property
    def per_rank(self) -> bool:
        """Older name of :attr:`per_action` (one entry per candidate)."""
        return self.per_action


@dataclass(frozen=True)
class ObservationLayout:
    """Feature table of the observation for ``n_actions`` actions.

    Args:
        n_actions: Actions of the grid.
        budgeted: Episodes have a FLOPs budget (adds ``budget_left`` and ``steps_left``).
        input_costs: The method's costs depend on the input (``topp``): adds what the layer
            realised on the previous segment (kept fraction and FLOPs ratio), the cost
            forecast of a policy; ``action_cost`` then holds each action's upper bound.
    """

    n_actions: int
    budgeted: bool = False
    input_costs: bool = False

    @property
    def n_ranks(self) -> int:
        """Older name of :attr:`n_actions`."""
        return self.n_actions

    @cached_property
    def features(self) -> tuple[Feature, ...]:
        k = self.n_actions
        features = [
            Feature("layer", 1, 0, 1, "layer index / (layers - 1)"),
            Feature("segment", 1, 0, 1, "segment index / (segments - 1)"),
            Feature("prev_rank_layer", 1, 0, 1, "this layer's rank on the previous segment / d"),
            Feature("prev_rank_step", 1, 0, 1, "rank chosen at the previous step / d"),
            Feature("energy", k, 0, 1, "spectral energy retained at each action's rank", True),
            Feature("perturbation", k, 0, 1, "perturbation of moving to each action's rank", True),
            Feature(
                "action_cost",
                k,
                0,
                MAX_FLOPS_RATIO,
                "executed / exact attention FLOPs of each action at this step",
                True,
            ),
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
                "executed / exact attention FLOPs so far in the episode",
            ),
        ]
        if self.input_costs:
            features += [
                Feature(
                    "kept_prev_layer",
                    1,
                    0,
                    1,
                    "keys this layer attended on the previous segment / its causal keys",
                ),
                Feature(
                    "cost_prev_layer",
                    1,
                    0,
                    MAX_FLOPS_RATIO,
                    "executed / exact FLOPs of this layer on the previous segment",
                ),
            ]
        if self.budgeted:
            features += [
                Feature("budget_left", 1, 0, 1, "FLOPs budget left / exact FLOPs of the episode"),
                Feature("steps_left", 1, 0, 1, "steps left / steps of the episode"),
                Feature(
                    "budget_per_step",
                    1,
                    0,
                    MAX_FLOPS_RATIO,
                    "budget left per step left / exact FLOPs of an average step",
                ),
            ]
        return tuple(features)

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


@dataclass(frozen=True)
class EpisodePlan:
    """The static entries of an episode's observations (:meth:`ObservationBuilder.plan`).

    Attributes:
        base: (steps, size) float64 observations with the dynamic entries left at 0.
        cumulative: (steps, d + 1) cumulative spectrum of each step, from 0.
    """

    base: np.ndarray
    cumulative: np.ndarray


@dataclass
class StepState:
    """Where an episode stands, as the observation needs it."""

    segment: int
    layer: int
    prev_rank_layer: int
    prev_rank_step: int
    spent: float
    budget_left: float | None = None
    steps_left: int = 0
    prev_kept_layer: float = 1.0
    prev_cost_layer: float = 1.0


class ObservationBuilder:
    """Writes observations of a layout for one environment.

    Args:
        layout: The feature table.
        n_layers, n_segments, head_dim: The episode's shape.
        action_ranks: (A,) rank of each action.
        action_costs: (S, A) executed / exact FLOPs of each action at each segment.
        weight_stats: (L, 3) projection-weight statistics.
        episode_full_flops: Exact attention FLOPs of the whole episode.
        steps: Episode length.
    """

    def __init__(
        self,
        layout: ObservationLayout,
        n_layers: int,
        n_segments: int,
        head_dim: int,
        action_ranks: np.ndarray,
        action_costs: np.ndarray,
        weight_stats: np.ndarray,
        episode_full_flops: float,
        steps: int,
    ) -> None:
        self.layout, self.n_layers, self.n_segments = layout, n_layers, n_segments
        self.head_dim, self.steps = head_dim, steps
        self.action_ranks = np.asarray(action_ranks)
        self.action_costs = np.clip(np.asarray(action_costs, dtype=np.float64), 0, MAX_FLOPS_RATIO)
        self.weight_stats = np.asarray(weight_stats, dtype=np.float64)
        self.episode_full_flops = float(episode_full_flops)
        check_finite("weight_stats", self.weight_stats)

    def perturbations(self, spectrum: np.ndarray, previous_rank: int) -> np.ndarray:
        """(A,) perturbation of moving from ``previous_rank`` to each action's rank."""
        cumulative = np.concatenate([[0.0], np.cumsum(spectrum)])
        energy = cumulative[self.action_ranks]
        return np.sqrt(np.clip(np.abs(energy - cumulative[previous_rank]), 0.0, 1.0))

    def build(
        self, state: StepState, spectrum: np.ndarray, input_stats: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The observation of the step and the perturbation of each action."""
        check_finite("spectrum", spectrum)
        check_finite("input_stats", input_stats)
        cumulative = np.concatenate([[0.0], np.cumsum(spectrum)])
        perturbations = self.perturbations(spectrum, state.prev_rank_layer)
        d = self.head_dim
        parts = [
            [
                state.layer / max(self.n_layers - 1, 1),
                state.segment / max(self.n_segments - 1, 1),
                state.prev_rank_layer / d,
                state.prev_rank_step / d,
            ],
            np.clip(cumulative[self.action_ranks], 0.0, 1.0),
            perturbations,
            self.action_costs[state.segment],
            np.clip(input_stats, -1.0, 1.0),
            self.weight_stats[state.layer],
            [self.spent_ratio(state.spent)],
        ]
        if self.layout.input_costs:
            parts.append(
                [
                    min(max(state.prev_kept_layer, 0.0), 1.0),
                    min(max(state.prev_cost_layer, 0.0), MAX_FLOPS_RATIO),
                ]
            )
        if self.layout.budgeted:
            parts.append(self.budget_features(state))
        return np.concatenate(parts).astype(np.float32), perturbations

    # -- the fast path: a whole episode's static entries at once -----------------------------

    def plan(self, spectra: np.ndarray, input_stats: np.ndarray) -> EpisodePlan:
        """Every entry of an episode's observations that the agent's choices cannot change.

        Args:
            spectra: (steps, d) spectrum of each step (segment-major, layer-minor).
            input_stats: (steps, 3) layer-input statistics of each step.

        Returns:
            The plan :meth:`fill` completes step by step; ``fill(plan, state)`` equals
            :meth:`build` of the same step (a test checks every entry).
        """
        check_finite("spectrum", spectra)
        check_finite("input_stats", input_stats)
        steps = spectra.shape[0]
        cumulative = np.concatenate([np.zeros((steps, 1)), np.cumsum(spectra, axis=1)], axis=1)
        t = np.arange(steps)
        segment, layer = t // self.n_layers, t % self.n_layers
        base = np.zeros((steps, self.layout.size), dtype=np.float64)
        slices = self.layout.slices
        base[:, slices["layer"]] = (layer / max(self.n_layers - 1, 1))[:, None]
        base[:, slices["segment"]] = (segment / max(self.n_segments - 1, 1))[:, None]
        base[:, slices["energy"]] = np.clip(cumulative[:, self.action_ranks], 0.0, 1.0)
        base[:, slices["action_cost"]] = self.action_costs[segment]
        base[:, slices["sequence_dynamics"]] = np.clip(input_stats, -1.0, 1.0)
        base[:, slices["layer_weights"]] = self.weight_stats[layer]
        return EpisodePlan(base, cumulative)

    def fill(self, plan: EpisodePlan, step: int, state: StepState) -> tuple[np.ndarray, np.ndarray]:
        """The observation of ``step`` from its plan and the episode's state (see :meth:`plan`)."""
        cumulative = plan.cumulative[step]
        energy = cumulative[self.action_ranks]
        perturbations = np.sqrt(
            np.clip(np.abs(energy - cumulative[state.prev_rank_layer]), 0.0, 1.0)
        )
        row = plan.base[step].copy()
        slices = self.layout.slices
        row[slices["prev_rank_layer"]] = state.prev_rank_layer / self.head_dim
        row[slices["prev_rank_step"]] = state.prev_rank_step / self.head_dim
        row[slices["perturbation"]] = perturbations
        row[slices["flops_spent"]] = self.spent_ratio(state.spent)
        if self.layout.input_costs:
            row[slices["kept_prev_layer"]] = min(max(state.prev_kept_layer, 0.0), 1.0)
            row[slices["cost_prev_layer"]] = min(max(state.prev_cost_layer, 0.0), MAX_FLOPS_RATIO)
        if self.layout.budgeted:
            left, steps_left, per_step = self.budget_features(state)
            row[slices["budget_left"]] = left
            row[slices["steps_left"]] = steps_left
            row[slices["budget_per_step"]] = per_step
        return row.astype(np.float32), perturbations

    def terminal(self, state: StepState) -> np.ndarray:
        """The observation after the last step: zeros but the FLOPs (and budget) features."""
        observation = np.zeros(self.layout.size, dtype=np.float32)
        observation[self.layout.slices["flops_spent"]] = self.spent_ratio(state.spent)
        if self.layout.budgeted:
            observation[self.layout.slices["budget_left"]] = self.budget_ratio(state.budget_left)
        return observation

    def budget_features(self, state: StepState) -> list[float]:
        """``budget_left``, ``steps_left`` and ``budget_per_step`` of a running episode."""
        left = self.budget_ratio(state.budget_left)
        per_step = left * self.steps / state.steps_left if state.steps_left else 0.0
        return [left, state.steps_left / self.steps, min(per_step, MAX_FLOPS_RATIO)]

    def spent_ratio(self, spent: float) -> float:
        return min(spent / self.episode_full_flops, MAX_FLOPS_RATIO)

    def budget_ratio(self, left: float | None) -> float:
        return float(np.clip((left or 0.0) / self.episode_full_flops, 0.0, 1.0))


def check_finite(name: str, values: np.ndarray) -> None:
    """ValueError naming ``name`` if ``values`` holds NaN or infinity."""
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(
            f"{name} holds non-finite values ({np.count_nonzero(~np.isfinite(array))} of "
            f"{array.size}): a corrupt cache or a model producing NaN"
        )

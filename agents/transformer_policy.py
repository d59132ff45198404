"""The DR-RL paper's Transformer policy: an encoder over state tokens built from the observation.

The flat observation of :class:`~drrl_env.envs.dynamic_rank.DynamicRankEnv` is cut into
tokens following its :class:`~drrl_env.envs.observation.ObservationLayout`:

- one token per candidate rank ``k``: its per-rank features (energy retained ``e_k``,
  perturbation of moving there ``p_k``) and the rank itself as a fraction of the head dim;
- one token per remaining feature group: the position and previous ranks ``r_{t-1}``
  (layer, segment, previous rank of the layer and of the step), the sequence dynamics
  ``h_t``, the layer statistics ``w_t``, the FLOPs spent so far; a feature the layout adds
  later becomes a token of its own.

Each kind of token has its own linear projection to ``d_model`` and a learned type
embedding; a learned ``[CLS]`` token is prepended, a small ``nn.TransformerEncoder`` mixes
the sequence and the ``[CLS]`` output, projected to ``features_dim``, is the feature vector
handed to SB3's policy / value / Q heads. Being a ``BaseFeaturesExtractor``, it plugs into
PPO, A2C, DQN and MaskablePPO alike (``policy_kwargs=dict(features_extractor_class=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from drrl_env.envs.observation import ObservationLayout

MERGED_GROUPS: dict[str, tuple[str, ...]] = {
    "position": ("layer", "segment", "prev_rank_layer", "prev_rank_step"),
}
"""Scalar features that share one token; every other non-per-rank feature is its own token."""


@dataclass(frozen=True)
class TokenSpec:
    """Where each state token reads its entries in the flat observation."""

    rank_features: tuple[str, ...]
    """Names of the per-rank features, in the order of a rank token's inputs."""
    rank_index: np.ndarray
    """(K, P) observation indices: entry ``[k, j]`` is per-rank feature ``j`` at rank ``k``."""
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    """(token name, observation indices) of each feature-group token."""

    @property
    def n_ranks(self) -> int:
        return int(self.rank_index.shape[0])

    @property
    def n_tokens(self) -> int:
        """Tokens the encoder sees: ``[CLS]``, one per rank, one per group."""
        return 1 + self.n_ranks + len(self.groups)


def layout_for_space(observation_space: spaces.Space) -> ObservationLayout:
    """Reconstruct the observation layout from a flat Box space's size.

    The size is ``fixed + per_action * n_actions``, with a larger ``fixed`` for budgeted
    episodes and for input-dependent costs (``topp``). A size that fits several is read as
    the first of unbudgeted, budgeted, input-dependent costs: pass the env's layout
    (``env.unwrapped.layout``) for a budgeted env, as :func:`agents.make_agent` does. Every
    constant comes from the layout itself.

    Raises:
        ValueError: The space is not a 1-D Box, or its size fits no action grid.
    """
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(
            f"the transformer policy needs a flat Box observation space, got {observation_space}"
        )
    size = observation_space.shape[0]
    for budgeted, input_costs in ((False, False), (True, False), (False, True), (True, True)):
        empty = ObservationLayout(0, budgeted, input_costs=input_costs)
        per_action = sum(1 for f in empty.features if f.per_action)
        n_actions, rest = divmod(size - empty.size, per_action)
        layout = ObservationLayout(max(n_actions, 0), budgeted, input_costs=input_costs)
        if n_actions >= 1 and not rest and layout.size == size:
            return layout
    empty = ObservationLayout(0)
    per_action = sum(1 for f in empty.features if f.per_action)
    raise ValueError(
        f"observation size {size} is not a dynamic-rank observation: expected "
        f"{empty.size} (+3 with a budget, +2 with input-dependent costs) + {per_action} * "
        "n_actions entries, n_actions >= 1"
    )


def token_spec(layout: ObservationLayout) -> TokenSpec:
    """Group the layout's features into state tokens (see the module docstring)."""
    per_rank = [f for f in layout.features if f.per_rank]
    rank_index = np.array(
        [[layout.slices[f.name].start + k for f in per_rank] for k in range(layout.n_ranks)],
        dtype=np.int64,
    ).reshape(layout.n_ranks, len(per_rank))
    member_of = {name: group for group, names in MERGED_GROUPS.items() for name in names}
    groups: dict[str, list[int]] = {}
    for feature in layout.features:
        if feature.per_rank:
            continue
        indices = groups.setdefault(member_of.get(feature.name, feature.name), [])
        indices.extend(range(layout.slices[feature.name].start, layout.slices[feature.name].stop))
    return TokenSpec(
        rank_features=tuple(f.name for f in per_rank),
        rank_index=rank_index,
        groups=tuple((name, tuple(indices)) for name, indices in groups.items()),
    )


def default_rank_fractions(n_ranks: int) -> tuple[float, ...]:
    """``rank / head_dim`` of the default grid (evenly spaced multiples ending at full rank)."""
    return tuple((k + 1) / n_ranks for k in range(n_ranks))


class StateTokenExtractor(BaseFeaturesExtractor):
    """Transformer encoder over the state tokens of a dynamic-rank observation.

    Args:
        observation_space: The env's flat Box observation space.
        layout: The env's observation layout; reconstructed from the space's size if None.
        rank_fractions: ``rank / head_dim`` of each candidate rank (the env's grid); the
            default grid's values if None.
        d_model: Token width.
        n_heads: Attention heads (must divide ``d_model``).
        n_layers: Encoder layers.
        dim_feedforward: Hidden width of the encoder's feed-forward blocks.
        dropout: Encoder dropout.
        features_dim: Size of the output feature vector.

    Raises:
        ValueError: The space does not match the layout, or the sizes are inconsistent.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        layout: ObservationLayout | None = None,
        rank_fractions: Sequence[float] | None = None,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        dim_feedforward: int = 64,
        dropout: float = 0.0,
        features_dim: int = 64,
    ) -> None:
        layout = _checked_layout(observation_space, layout)
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        super().__init__(observation_space, features_dim)
        self.spec = token_spec(layout)
        fractions = _checked_fractions(rank_fractions, layout.n_ranks)
        self.register_buffer("rank_index", torch.as_tensor(self.spec.rank_index), False)
        self.register_buffer("fractions", torch.tensor(fractions).reshape(1, -1, 1), False)
        flat = [i for _, indices in self.spec.groups for i in indices]
        self.register_buffer("group_index", torch.as_tensor(flat, dtype=torch.long), False)
        self.group_sizes = [len(indices) for _, indices in self.spec.groups]
        self.rank_proj = nn.Linear(len(self.spec.rank_features) + 1, d_model)
        self.group_proj = nn.ModuleList(nn.Linear(n, d_model) for n in self.group_sizes)
        self.type_embedding = nn.Embedding(1 + len(self.group_sizes), d_model)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.encoder = _encoder(d_model, n_heads, n_layers, dim_feedforward, dropout)
        self.head = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, features_dim), nn.ReLU()
        )

    def tokens(self, observations: torch.Tensor) -> torch.Tensor:
        """The embedded token sequence ``(batch, n_tokens, d_model)``, ``[CLS]`` first."""
        batch = observations.shape[0]
        types = self.type_embedding.weight
        per_rank = observations[:, self.rank_index]
        fractions = self.fractions.to(observations.dtype).expand(batch, -1, -1)
        ranks = self.rank_proj(torch.cat([per_rank, fractions], dim=-1)) + types[0]
        parts = observations[:, self.group_index].split(self.group_sizes, dim=1)
        groups = [
            proj(part) + types[i + 1]
            for i, (proj, part) in enumerate(zip(self.group_proj, parts, strict=True))
        ]
        return torch.cat([self.cls.expand(batch, -1, -1), ranks, torch.stack(groups, 1)], 1)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(self.tokens(observations))
        return self.head(encoded[:, 0])


def _encoder(
    d_model: int, n_heads: int, n_layers: int, dim_feedforward: int, dropout: float
) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model,
        n_heads,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


def _checked_layout(
    observation_space: spaces.Space, layout: ObservationLayout | None
) -> ObservationLayout:
    derived = layout_for_space(observation_space)
    if layout is not None and layout.size != derived.size:
        raise ValueError(
            f"layout has {layout.size} entries ({layout.n_ranks} ranks) but the observation "
            f"space has {observation_space.shape[0]}"
        )
    return layout if layout is not None else derived


def _checked_fractions(fractions: Sequence[float] | None, n_ranks: int) -> list[float]:
    values = list(default_rank_fractions(n_ranks) if fractions is None else fractions)
    if len(values) != n_ranks or not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(
            f"rank_fractions must hold {n_ranks} values in (0, 1] (rank / head_dim), got {values}"
        )
    return [float(v) for v in values]

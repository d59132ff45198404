"""``gram``: scores in the top-r eigenbasis of ``G = Q^T Q + K^T K``, found online.

Per query head, ``G`` sums the segment's query Gram and the key Gram of every key in the
cache; ``K^T K`` is kept per key/value head and updated with each segment's new keys only
(the "incremental" part of the DR-RL paper). The eigendecomposition is what the observation
shows (the spectrum), so it runs at every call; at a rank below ``d`` its eigenvectors are
also the basis: ``scores = (Q P)(K P)^T`` with ``P`` the top ``r`` eigenvectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from drrl_env.flops import FlopsBreakdown, eigh_flops
from drrl_env.methods.base import (
    AttentionMethod,
    CallShape,
    Setting,
    core_flops,
    lowrank_scores_attention,
    normalized_energy,
    repeat_kv,
)


def update_key_gram(state: dict[str, Any], fresh: torch.Tensor) -> torch.Tensor:
    """Add ``fresh`` keys (B, Hkv, n, d) to the state's key Gram (B, Hkv, d, d) and return it."""
    update = torch.matmul(fresh.transpose(-1, -2), fresh)  # (B, Hkv, d, d)
    gram = state.get("key_gram")
    state["key_gram"] = update if gram is None else gram + update
    return state["key_gram"]


def key_gram_flops(shape: CallShape) -> int:
    """The incremental key-Gram update: ``2 n_new d^2`` per key/value head."""
    return 2 * shape.new_keys * shape.head_dim**2 * shape.kv_heads


class GramMethod(AttentionMethod):
    """Online eigenbasis of ``Q^T Q + K^T K`` per query head."""

    name = "gram"
    low_rank_scores = True
    description = "top-r eigenvectors of Q^T Q + K^T K per query head, found at every call"

    def observe(self, state, query, key) -> np.ndarray:
        fresh = self.new_keys(state, key)
        groups = query.shape[1] // key.shape[1]
        key_gram = repeat_kv(update_key_gram(state, fresh), groups)  # (B, H, d, d)
        gram = torch.matmul(query.transpose(-1, -2), query) + key_gram  # (B, H, d, d)
        values, vectors = torch.linalg.eigh(gram)  # ascending
        state["vectors"] = vectors.flip(-1)  # (B, H, d, d), by decreasing eigenvalue
        return normalized_energy(values.flip(-1))

    @staticmethod
    def projected(state, query, key, value, rank: int):
        """Queries (B, H, T, r), keys (B, H, N, r) in the first ``rank`` eigenvectors, and
        the values repeated per query head (B, H, N, d)."""
        groups = query.shape[1] // key.shape[1]
        basis = state["vectors"][..., :rank]  # (B, H, d, r)
        query_proj = torch.matmul(query, basis)
        key_proj = torch.matmul(repeat_kv(key, groups), basis)
        return query_proj, key_proj, repeat_kv(value, groups)

    def reference(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        if setting.is_exact(self.head_dim):
            return super().reference(state, query, key, value, mask, scaling, setting)
        query_proj, key_proj, values = self.projected(state, query, key, value, setting.rank)
        return lowrank_scores_attention(query_proj, key_proj, values, mask, scaling)

    has_fused = True

    def fused(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """Scores at rank r and ``A V`` at d in one FlexAttention kernel (causal)."""
        from drrl_env.methods.fused import fused_scores_attention

        if setting.is_exact(self.head_dim):
            return self.attend(state, query, key, value, mask, scaling, setting)
        query_proj, key_proj, values = self.projected(state, query, key, value, setting.rank)
        return fused_scores_attention(query_proj, key_proj, values, scaling)

    def feature_flops(self, shape: CallShape) -> FlopsBreakdown:
        d, t = shape.head_dim, shape.queries
        per_query_head = 2 * t * d * d + d * d + eigh_flops(d)  # Q^T Q, + K^T K, eigh
        return FlopsBreakdown(features=shape.heads * per_query_head + key_gram_flops(shape)).scaled(
            shape.batch
        )

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        d, t, n, r, h = shape.head_dim, shape.queries, shape.keys, setting.rank, shape.heads
        projections = FlopsBreakdown(projections=h * (2 * t * d * r + 2 * n * d * r))
        return (projections + core_flops(t, n, d, r, h)).scaled(shape.batch)

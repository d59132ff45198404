"""``svd``: the DR-RL paper's separate truncated SVDs of Q and K (its Eq. 13).

Scores ``(Q V_q)(V_q^T V_k)(K V_k)^T`` with ``V_q`` the top-r right singular vectors of the
segment's queries (per query head) and ``V_k`` those of all keys in the cache (per
key/value head). The right singular vectors of ``K`` are the eigenvectors of ``K^T K``,
which is kept incrementally (as in ``gram``) and decomposed at every call: its eigenvalues
(the squared singular values of ``K``) are the spectrum the observation shows. ``V_q``
comes from an SVD of the queries once the rank is chosen.
"""

from __future__ import annotations

import numpy as np
import torch

from drrl_env.flops import FlopsBreakdown, eigh_flops, svd_flops
from drrl_env.methods.base import (
    AttentionMethod,
    CallShape,
    Setting,
    core_flops,
    lowrank_scores_attention,
    normalized_energy,
    repeat_kv,
)
from drrl_env.methods.gram import key_gram_flops, update_key_gram


class SVDMethod(AttentionMethod):
    """Separate truncated SVDs of queries and keys."""

    name = "svd"
    low_rank_scores = True
    description = "the paper's separate truncated SVDs of Q and K (Eq. 13)"

    def observe(self, state, query, key) -> np.ndarray:
        fresh = self.new_keys(state, key)
        values, vectors = torch.linalg.eigh(update_key_gram(state, fresh))  # (B, Hkv, d)
        state["key_vectors"] = vectors.flip(-1)  # (B, Hkv, d, d), by decreasing value
        return normalized_energy(values.flip(-1))

    def reference(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        if setting.is_exact(self.head_dim):
            return super().reference(state, query, key, value, mask, scaling, setting)
        rank, groups = setting.rank, query.shape[1] // key.shape[1]
        query_right = torch.linalg.svd(query, full_matrices=False).Vh[..., :rank, :]  # (B,H,r,d)
        key_right = state["key_vectors"][..., :rank].transpose(-1, -2)  # (B, Hkv, r, d)
        key_proj = torch.matmul(key, key_right.transpose(-1, -2))  # (B, Hkv, N, r)
        core = torch.matmul(query_right, repeat_kv(key_right, groups).transpose(-1, -2))
        query_proj = torch.matmul(torch.matmul(query, query_right.transpose(-1, -2)), core)
        return lowrank_scores_attention(
            query_proj, repeat_kv(key_proj, groups), repeat_kv(value, groups), mask, scaling
        )

    def feature_flops(self, shape: CallShape) -> FlopsBreakdown:
        eigh = shape.kv_heads * eigh_flops(shape.head_dim)
        return FlopsBreakdown(features=key_gram_flops(shape) + eigh).scaled(shape.batch)

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        d, t, n, r = shape.head_dim, shape.queries, shape.keys, setting.rank
        h, kv = shape.heads, shape.kv_heads
        subspace = h * (svd_flops(t, d) + 2 * r * d * r)  # SVD of Q, then V_q^T V_k
        projections = h * (2 * t * d * r + 2 * t * r * r) + kv * 2 * n * d * r
        extra = FlopsBreakdown(subspace=subspace, projections=projections)
        return (extra + core_flops(t, n, d, r, h)).scaled(shape.batch)

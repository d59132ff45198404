"""``calibrated``: a fixed basis per layer, found offline; keys are rotated once, a rank is a slice.

The bases come from calibration windows (:mod:`drrl_env.lm.calibration`): eigenvectors of
the post-RoPE query and key Gram ``Q^T Q + K^T K`` per (layer, query head) for
``calibrated``, or summed over the query heads of a key/value head for ``calibrated-kv``
(one basis per (layer, kv head), which ``topk`` uses too). Each key is rotated into its
head's basis once, when it enters the KV cache, and kept rotated (the method's own cache);
the running energy of every rotated coordinate is the spectrum the observation shows (no
eigendecomposition per call). At rank ``r`` the queries are rotated onto the first ``r``
basis vectors and the scores use the first ``r`` rotated key coordinates: zero overhead
beyond one rotation per key.
"""

from __future__ import annotations

import numpy as np
import torch

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods.base import (
    AttentionMethod,
    CallShape,
    Setting,
    core_flops,
    lowrank_scores_attention,
    normalized_energy,
    repeat_kv,
)

SCOPES = ("kv_head", "query_head")


class CalibratedMethod(AttentionMethod):
    """Fixed bases, one per (layer, query head); keys kept rotated (per query head).

    Args:
        head_dim: Head dimension ``d``.
        n_layers: Attention layers.
        basis: (layers, bases, d, d) orthonormal bases, columns by decreasing calibration
            energy; ``bases`` is the number of key/value heads (or query heads for the
            ``query_head`` scope). Without it the instance only counts FLOPs.
    """

    name = "calibrated"
    low_rank_scores = True
    description = "fixed basis per (layer, query head) from calibration; keys rotated once"
    needs_basis = True
    scope = "query_head"
    version = 2  # one basis per query head (it was per kv head)

    def __init__(self, head_dim: int, n_layers: int, basis: torch.Tensor | None = None) -> None:
        super().__init__(head_dim, n_layers)
        self._on_device: dict[tuple, torch.Tensor] = {}
        self.basis = None if basis is None else self._checked(basis)

    def _checked(self, basis: torch.Tensor) -> torch.Tensor:
        shape = tuple(basis.shape)
        if len(shape) != 4 or shape[0] != self.n_layers or shape[2:] != (self.head_dim,) * 2:
            raise ValueError(
                f"basis has shape {shape}, expected (layers, heads, d, d) with "
                f"layers={self.n_layers}, d={self.head_dim}: a basis of another model?"
            )
        return basis.detach().float()

    def _layer_basis(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """(bases, d, d) basis of ``layer`` on ``like``'s device and dtype."""
        if self.basis is None:
            raise ValueError(
                f"method {self.name!r} needs basis= (see drrl_env.lm.calibration); this "
                "instance can count FLOPs only"
            )
        key = (like.device, like.dtype)
        if key not in self._on_device:
            self._on_device[key] = self.basis.to(device=like.device, dtype=like.dtype)
        return self._on_device[key][layer]

    def _check_heads(self, query: torch.Tensor, key: torch.Tensor) -> int:
        bases = self.basis.shape[1]
        heads = key.shape[1] if self.scope == "kv_head" else query.shape[1]
        if bases != heads:
            raise ValueError(
                f"basis has {bases} heads per layer, the model's {self.scope.replace('_', ' ')}s "
                f"are {heads}: a basis of another scope or model?"
            )
        return query.shape[1] // key.shape[1]

    def observe(self, state, query, key) -> np.ndarray:
        groups = self._check_heads(query, key)
        fresh = self.new_keys(state, key)  # (B, Hkv, n, d)
        if self.scope == "query_head":
            fresh = repeat_kv(fresh, groups)  # (B, H, n, d)
        rotated = torch.matmul(fresh, self._layer_basis(state["layer"], query))  # (B, Hb, n, d)
        cached = state.get("rotated_keys")
        state["rotated_keys"] = rotated if cached is None else torch.cat([cached, rotated], dim=2)
        energy = rotated.pow(2).sum(dim=2)  # (B, Hb, d)
        state["energy"] = energy if "energy" not in state else state["energy"] + energy
        return normalized_energy(state["energy"])

    def rotated(self, state, query, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, r) and cached keys (B, H, N, r) in the first ``rank`` directions."""
        basis = self._layer_basis(state["layer"], query)[..., :rank]  # (Hb, d, r)
        keys = state["rotated_keys"][..., :rank]  # (B, Hb, N, r)
        if self.scope == "kv_head":
            groups = query.shape[1] // basis.shape[0]
            basis = basis.repeat_interleave(groups, dim=0)  # (H, d, r)
            keys = repeat_kv(keys, groups)
        return torch.matmul(query, basis), keys  # (B, H, T, r), (B, H, N, r)

    def reference(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        if setting.is_exact(self.head_dim):
            return super().reference(state, query, key, value, mask, scaling, setting)
        query_proj, key_proj = self.rotated(state, query, setting.rank)
        groups = query.shape[1] // key.shape[1]
        return lowrank_scores_attention(
            query_proj, key_proj, repeat_kv(value, groups), mask, scaling
        )

    has_fused = True

    def fused(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """Scores at rank r and ``A V`` at d in one FlexAttention kernel (causal)."""
        from drrl_env.methods.fused import fused_scores_attention

        if setting.is_exact(self.head_dim):
            return self.attend(state, query, key, value, mask, scaling, setting)
        basis = self._layer_basis(state["layer"], query)[..., : setting.rank]  # (Hb, d, r)
        keys = state["rotated_keys"][..., : setting.rank]  # (B, Hb, N, r): kv heads stay shared
        if self.scope == "kv_head":
            basis = basis.repeat_interleave(query.shape[1] // basis.shape[0], dim=0)
            values = value
        else:
            values = repeat_kv(value, query.shape[1] // key.shape[1])
        return fused_scores_attention(torch.matmul(query, basis), keys, values, scaling)

    def _bases(self, shape: CallShape) -> int:
        return shape.kv_heads if self.scope == "kv_head" else shape.heads

    def feature_flops(self, shape: CallShape) -> FlopsBreakdown:
        d, n_new = shape.head_dim, shape.new_keys
        rotate_and_energy = 2 * n_new * d * d + 2 * n_new * d
        return FlopsBreakdown(features=self._bases(shape) * rotate_and_energy).scaled(shape.batch)

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        d, t, n, r, h = shape.head_dim, shape.queries, shape.keys, setting.rank, shape.heads
        rotate_queries = FlopsBreakdown(projections=h * 2 * t * d * r)
        return (rotate_queries + core_flops(t, n, d, r, h)).scaled(shape.batch)


class KVHeadCalibratedMethod(CalibratedMethod):
    """Fixed bases per (layer, key/value head): a key is rotated once for all its query heads."""

    name = "calibrated-kv"
    description = "fixed basis per (layer, kv head) from calibration; keys rotated once"
    scope = "kv_head"

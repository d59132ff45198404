"""``topk-block``: rank-guided block-sparse attention, run as a FlexAttention block mask.

Like ``topk``, the scores at the chosen rank (in the fixed rotated basis of
``calibrated-kv``) only select keys, and exact attention runs on the selection; here the
unit is a block: queries and keys are cut into blocks of ``block``, each (query block, key
block) pair scores the largest rank-r score inside it, and each query block keeps its top
``keep`` times the key blocks the segment sees (never fewer than ``ceil(min_keys /
block)``, all it can see when that is fewer, always its diagonal block). Exact attention
then runs on the kept blocks in one fused kernel
(:func:`~drrl_env.methods.fused.fused_block_sparse_attention`), causal inside them. The
selection differs from per-query top-k (a whole block is kept or dropped), so it is a
method of its own.

Executed FLOPs per query head: ``2 T d r`` (rotate queries) + ``2 T N r`` (selection
scores) + ``T N`` (the block maxima) + per kept block ``block^2 (4 d + 5)`` (exact attention
on the whole block, as the fused kernel computes it, causal masking inside included), plus
the rotation of each new key once (``features``). ``T`` and ``N`` must be multiples of
``block``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods.base import CallShape, Setting, ceil_div, check_option, repeat_kv
from drrl_env.methods.calibrated import KVHeadCalibratedMethod

BLOCK = 64
"""Query and key block size."""


def kept_blocks(visible: np.ndarray, keep: float, min_blocks: int, blocks: int) -> np.ndarray:
    """Key blocks each query block keeps: ``min(n_b, max(min_blocks, ceil(keep * blocks)))``.

    ``blocks`` is the number of key blocks the segment sees, ``n_b`` those the query block
    sees (causal).
    """
    wanted = max(min_blocks, int(np.ceil(keep * blocks - 1e-9)))
    return np.minimum(visible, wanted)


class TopKBlockMethod(KVHeadCalibratedMethod):
    """Block selection from rank-r scores; exact attention on the kept blocks, fused.

    Args:
        head_dim: Head dimension ``d``.
        n_layers: Attention layers.
        basis: (layers, kv heads, d, d) calibrated bases (as for ``calibrated-kv``).
        block: Query and key block size.
        min_keys: Fewest keys a query block attends (rounded up to whole blocks).
    """

    name = "topk-block"
    low_rank_scores = False
    description = "rank-r scores select key blocks per query block; fused block-sparse attention"
    uses_keep = True
    has_fused = True
    version = 2  # keep is a fraction of the segment's key blocks
    dense_fast_path = False
    """The kernel the model runs never builds (H, T, N) tensors."""

    def __init__(
        self,
        head_dim: int,
        n_layers: int,
        basis: torch.Tensor | None = None,
        block: int = BLOCK,
        min_keys: int = 64,
    ) -> None:
        super().__init__(head_dim, n_layers, basis)
        self.block = check_option("block", block)
        self.min_blocks = ceil_div(check_option("min_keys", min_keys), block)

    def _blocks_of(self, queries: int, keys: int) -> tuple[int, int, np.ndarray]:
        """(query blocks, key blocks, (QB,) key blocks each query block can see)."""
        if queries % self.block or keys % self.block:
            raise ValueError(
                f"topk-block needs queries ({queries}) and keys ({keys}) that are multiples "
                f"of block={self.block}"
            )
        q_blocks, k_blocks = queries // self.block, keys // self.block
        visible = (keys - queries) // self.block + np.arange(1, q_blocks + 1)
        return q_blocks, k_blocks, visible

    def select_blocks(self, state, query, setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_num_blocks (B, H, QB), kv_indices (B, H, QB, KB)): the kept blocks, first."""
        query_proj, key_proj = self.rotated(state, query, setting.rank)  # (B,H,T,r), (B,H,N,r)
        batch, heads, queries, _ = query.shape
        q_blocks, k_blocks, visible = self._blocks_of(queries, key_proj.shape[2])
        counts = kept_blocks(visible, setting.keep, self.min_blocks, k_blocks)  # (QB,)
        indices = torch.zeros(
            batch, heads, q_blocks, k_blocks, dtype=torch.long, device=query.device
        )
        for q_block in range(q_blocks):
            rows = slice(q_block * self.block, (q_block + 1) * self.block)
            scores = torch.matmul(query_proj[:, :, rows], key_proj.transpose(2, 3))  # (B,H,b,N)
            pooled = scores.reshape(batch, heads, self.block, k_blocks, self.block).amax((2, 4))
            seen = int(visible[q_block])
            pooled[..., seen:] = float("-inf")  # blocks wholly in this block's future
            pooled[..., seen - 1] = float("inf")  # the diagonal block is always kept
            indices[:, :, q_block] = pooled.argsort(dim=-1, descending=True, stable=True)
        kept = torch.as_tensor(counts).expand(batch, heads, q_blocks)
        return kept.to(query.device), indices.to(query.device)

    def _dense_mask(self, kept, indices, queries: int, keys: int) -> torch.Tensor:
        """(B, H, T, N) keys each query attends: in a kept block and not in its future."""
        slots = torch.arange(indices.shape[-1], device=indices.device)
        chosen = slots < kept[..., None]  # (B, H, QB, KB) in slot order
        blocks = torch.zeros_like(chosen).scatter_(-1, indices, chosen)  # by block index
        expanded = blocks.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)
        causal = torch.ones(queries, keys, dtype=torch.bool, device=indices.device)
        return expanded & causal.tril(keys - queries)

    def reference(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """Dense eager reference: exact scores outside the kept blocks masked out."""
        if setting.is_exact(self.head_dim):
            return super().reference(state, query, key, value, mask, scaling, setting)
        groups = query.shape[1] // key.shape[1]
        kept, indices = self.select_blocks(state, query, setting)
        allowed = self._dense_mask(kept, indices, query.shape[2], key.shape[2])
        scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling
        weights = F.softmax(
            scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32
        )
        return torch.matmul(weights.to(value.dtype), repeat_kv(value, groups))  # (B, H, T, d)

    def attend(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """The fused block-sparse kernel (FlexAttention)."""
        return self.fused(state, query, key, value, mask, scaling, setting)

    def fused(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        from drrl_env.methods.fused import fused_block_sparse_attention

        if setting.is_exact(self.head_dim):
            return super().attend(state, query, key, value, mask, scaling, setting)
        kept, indices = self.select_blocks(state, query, setting)
        return fused_block_sparse_attention(query, key, value, scaling, kept, indices, self.block)

    def sweep_outputs(self, state, query, key, value, mask, scaling, settings) -> list:
        """Dense reference outputs (measurements need no fused kernel)."""
        return [
            self.reference(state, query, key, value, mask, scaling, setting) for setting in settings
        ]

    def kept_total(self, shape: CallShape, setting: Setting) -> int:
        """Causal keys inside the kept blocks, summed over sequences, query heads and queries.

        Every kept block is wholly in the queries' past but the diagonal one (always kept),
        in which the ``block`` queries see ``block (block + 1) / 2`` keys.
        """
        setting = self.check_setting(setting)
        if setting.is_exact(self.head_dim):
            return super().kept_total(shape, setting)
        _, k_blocks, visible = self._blocks_of(shape.queries, shape.keys)
        kept = kept_blocks(visible, setting.keep, self.min_blocks, k_blocks)  # (QB,)
        per_block = (kept - 1) * self.block**2 + self.block * (self.block + 1) // 2
        return shape.heads * shape.batch * int(per_block.sum())

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        d, t, n, r, h = shape.head_dim, shape.queries, shape.keys, setting.rank, shape.heads
        _, k_blocks, visible = self._blocks_of(t, n)
        kept = kept_blocks(visible, setting.keep, self.min_blocks, k_blocks)
        pairs = int(kept.sum()) * self.block**2
        return FlopsBreakdown(
            projections=h * 2 * t * d * r,
            scores=h * (2 * t * n * r + 2 * pairs * d),
            selection=h * t * n,
            softmax=h * 5 * pairs,
            output=h * 2 * pairs * d,
        ).scaled(shape.batch)

"""Fused kernels through torch FlexAttention: the fast paths of rank-controlled attention.

FlexAttention (``torch.nn.attention.flex_attention``, compiled) runs attention as one fused
kernel on CPU and CUDA, with a query/key head dim different from the value head dim, so
low-rank scores ``(Q P_r)(K P_r)^T`` keep their inner dimension ``r`` while ``A V`` runs at
``d``; and with a block mask, so block-sparse attention skips the blocks it drops. Every
function here has an eager reference beside it in the method that calls it, and the tests
check that the two agree.

The kernels assume one causal sequence: the ``T`` queries are the last ``T`` of the ``N``
keys (the segment runner's calls), so query ``i`` sees keys ``0 .. N - T + i``. Compiling
takes seconds per shape on a CPU (once per process and shape).
"""

from __future__ import annotations

from functools import lru_cache

import torch

_COMPILED: dict[str, object] = {}


RECOMPILE_LIMIT = 1024
"""Shapes compiled per process. Past torch's default of 8, dynamo would silently run the
eager ``flex_attention``, which materialises every score and ignores the key blocks a
``BlockMask`` selects (block-sparse attention would quietly become exact attention)."""


def flex_attention_compiled():
    """``flex_attention`` compiled once per process; never the eager fallback.

    Each new shape compiles once (``dynamic=False``); the recompile limit is raised to
    :data:`RECOMPILE_LIMIT` and hitting it raises instead of falling back to eager.
    """
    if "flex" not in _COMPILED:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        dynamo_config.accumulated_recompile_limit = max(
            dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT
        )
        dynamo_config.fail_on_recompile_limit_hit = True
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


@lru_cache(maxsize=256)
def causal_mask_mod(queries: int, keys: int):
    """FlexAttention mask: query ``q`` (0-based in the segment) sees keys up to ``q + N - T``."""
    offset = keys - queries

    def causal(batch, head, query, key):
        return key <= query + offset

    return causal


@lru_cache(maxsize=64)
def causal_block_mask(queries: int, keys: int, device: str, block: int):
    """The block mask of a causal segment (blocks entirely above the diagonal skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = causal_mask_mod(queries, keys)
    return create_block_mask(mask, None, None, queries, keys, device=device, BLOCK_SIZE=block)


def fused_scores_attention(
    query_proj: torch.Tensor,
    key_proj: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    block: int = 128,
) -> torch.Tensor:
    """Causal attention with scores at the projections' inner dimension, fused.

    Args:
        query_proj: (B, H, T, r) projected queries.
        key_proj: (B, Hk, N, r) projected keys; ``Hk`` divides ``H`` (grouped-query heads are
            expanded inside the kernel).
        value: (B, Hk, N, d) values, un-repeated like the keys.
        scaling: Score scale.
        block: Block size of the causal block mask.

    Returns:
        (B, H, T, d).
    """
    queries, keys = query_proj.shape[2], key_proj.shape[2]
    mask = causal_block_mask(queries, keys, str(query_proj.device), block)
    return flex_attention_compiled()(
        query_proj.contiguous(),
        key_proj.contiguous(),
        value.contiguous(),
        block_mask=mask,
        scale=scaling,
        enable_gqa=key_proj.shape[1] != query_proj.shape[1],
    )


def fused_block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """Exact causal attention over the key blocks each query block selected, fused.

    Args:
        query: (B, H, T, d). key, value: (B, Hkv, N, d), un-repeated.
        scaling: Score scale.
        kv_num_blocks: (B, H, T/block) key blocks selected per query block.
        kv_indices: (B, H, T/block, N/block) their indices first (the rest is ignored).
        block: Block size (divides ``T`` and ``N``).

    Returns:
        (B, H, T, d).
    """
    from torch.nn.attention.flex_attention import BlockMask

    queries, keys = query.shape[2], key.shape[2]
    mask = BlockMask.from_kv_blocks(
        kv_num_blocks.to(torch.int32),
        kv_indices.to(torch.int32),
        BLOCK_SIZE=block,
        mask_mod=causal_mask_mod(queries, keys),
        seq_lengths=(queries, keys),
    )
    return flex_attention_compiled()(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        block_mask=mask,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
        kernel_options=cuda_tiles(block, query.device),
    )


def cuda_tiles(block: int, device: torch.device) -> dict | None:
    """FlexAttention tile sizes that divide a block mask's ``block`` on CUDA, else None.

    The CUDA kernel needs the mask's blocks to be multiples of its tiles; its default
    float32 tile on recent GPUs is 128 queries by 32 keys, which does not divide a 64-token
    block. The CPU kernel takes no tile sizes.
    """
    if device.type != "cuda":
        return None
    return {"BLOCK_M": min(block, 64), "BLOCK_N": min(block, 32)}

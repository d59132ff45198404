"""Timing one attention layer: torch SDPA, the eager full-rank path and the low-rank kernels.

The building blocks of ``benchmarks/kernel_flops.py`` and ``experiments/flops_scaling.py``:
random inputs of an attention shape, the kernels exactly as the model runs them (through
:meth:`~drrl_env.lm.attention.RankController.attend`), each with its executed FLOPs from
:mod:`drrl_env.flops`, and a median wall-time measurement that synchronises CUDA.

Kernels, all on the same random Q/K/V (batch 1, causal, one segment of ``L`` queries over
``L`` keys):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal=True``), with
  the key/value heads repeated for grouped-query attention inside the timed call;
- ``full``: the eager :func:`~drrl_env.lm.attention.full_attention` (additive causal mask);
- ``gram``, ``svd``, ``calibrated`` at a rank: ``gram`` includes its Gram matrices and
  ``eigh``, ``svd`` its two SVDs, ``calibrated`` uses a fixed random orthonormal basis.

FLOPs are dense counts: the causal half is not skipped in the count, whatever a fused kernel
skips.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown, full_attention_flops, lowrank_attention_flops
from drrl_env.lm.attention import RankController, full_attention, repeat_kv

LOWRANK_METHODS = ("gram", "svd", "calibrated")
"""Methods whose kernels run at a rank below the head dim."""


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one attention layer (defaults: SmolLM2-135M)."""

    heads: int = 9
    """Query heads."""
    kv_heads: int = 3
    """Key/value heads (grouped-query attention); must divide ``heads``."""
    head_dim: int = 64
    """Head dimension ``d``."""

    def __post_init__(self) -> None:
        if min(self.heads, self.kv_heads, self.head_dim) < 1 or self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads={self.kv_heads} must divide heads={self.heads}, all positive "
                f"(head_dim={self.head_dim})"
            )


@dataclass(frozen=True)
class Kernel:
    """One timed attention kernel and its executed FLOPs."""

    name: str
    rank: int
    call: Callable[[], torch.Tensor]
    flops: FlopsBreakdown


def full_flops(shape: AttentionShape, length: int) -> FlopsBreakdown:
    """Executed FLOPs of full-rank attention at length ``length`` (all query heads)."""
    return full_attention_flops(length, length, shape.head_dim, shape.heads)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask (1, 1, L, L): 0 on and below the diagonal, dtype minimum above."""
    upper = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    return mask.masked_fill(upper, torch.finfo(dtype).min)[None, None]


def random_basis(
    heads: int, head_dim: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """A random orthonormal basis per query head, shaped (1 layer, H, d, d)."""
    gaussian = torch.randn(heads, head_dim, head_dim, generator=generator)
    return torch.linalg.qr(gaussian).Q[None].to(device)  # (1, H, d, d)


def controller_call(
    controller: RankController,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
) -> Callable[[], torch.Tensor]:
    """A fresh-sequence call of ``controller`` on layer 0 (accumulated Grams reset first)."""

    def call() -> torch.Tensor:
        controller.reset()
        return controller.attend(0, query, key, value, mask, scaling)

    return call


def attention_kernels(
    shape: AttentionShape,
    length: int,
    lowrank: Sequence[tuple[str, int]],
    device: torch.device,
    seed: int = 0,
) -> list[Kernel]:
    """``sdpa``, ``full`` and each ``(method, rank)`` of ``lowrank``, on the same inputs.

    The inputs are drawn from a generator seeded with ``seed + length``: Q, K, V, then the
    calibrated basis (drawn whether or not a ``calibrated`` kernel is asked for).

    Args:
        shape: The attention heads.
        length: Queries and keys ``L``.
        lowrank: ``(method, rank)`` pairs, methods from :data:`LOWRANK_METHODS`, ranks in
            ``1..head_dim``; kernels come back in this order after ``sdpa`` and ``full``.
        device: Where the inputs live and the kernels run.
        seed: Seed of the inputs.

    Raises:
        ValueError: An unknown method or a rank out of range.
    """
    generator = torch.Generator().manual_seed(seed + length)
    d, heads, kv_heads = shape.head_dim, shape.heads, shape.kv_heads
    query = torch.randn(1, heads, length, d, generator=generator).to(device)  # (B, H, T, d)
    key = torch.randn(1, kv_heads, length, d, generator=generator).to(device)  # (B, Hkv, N, d)
    value = torch.randn(1, kv_heads, length, d, generator=generator).to(device)
    mask = causal_mask(length, query.dtype, device)  # (1, 1, T, N)
    scaling = d**-0.5
    groups = heads // kv_heads
    basis = random_basis(heads, d, generator, device)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            query,
            repeat_kv(key, groups),
            repeat_kv(value, groups),
            is_causal=True,
            scale=scaling,
        )

    kernels = [
        Kernel("sdpa", d, sdpa, full_flops(shape, length)),
        Kernel(
            "full",
            d,
            lambda: full_attention(query, key, value, mask, scaling),
            full_flops(shape, length),
        ),
    ]
    for method, rank in lowrank:
        if method not in LOWRANK_METHODS:
            raise ValueError(f"method={method!r} is not one of {LOWRANK_METHODS}")
        controller = RankController(
            1,
            d,
            method=method,
            ranks=rank,
            record=False,
            basis=basis if method == "calibrated" else None,
        )
        flops = lowrank_attention_flops(length, length, d, rank, method, heads, kv_heads)
        call = controller_call(controller, query, key, value, mask, scaling)
        kernels.append(Kernel(method, rank, call, flops))
    return kernels


def time_call(
    call: Callable[[], torch.Tensor], warmup: int, repeats: int, device: torch.device
) -> tuple[float, torch.Tensor]:
    """Median wall seconds of ``repeats`` calls after ``warmup`` calls, and the last output."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    output = None
    for _ in range(warmup):
        output = call()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = call()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), output

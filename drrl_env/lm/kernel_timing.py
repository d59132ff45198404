"""Timing one attention layer: torch SDPA, the eager full-rank path and every method's kernels.

The building blocks of ``benchmarks/kernel_flops.py`` and ``experiments/flops_scaling.py``:
random inputs of an attention shape, the methods' kernels exactly as a layer call runs them
(:meth:`~drrl_env.methods.base.AttentionMethod.observe` for the observation's features,
then the kernel), each with its executed FLOPs from the method, and a median wall-time
measurement that synchronises CUDA.

Kernels, all on the same random Q/K/V (batch 1, causal, one segment of ``L`` queries over
``L`` keys):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal=True``,
  grouped-query heads expanded inside the fused kernel);
- ``full``: the eager :func:`~drrl_env.methods.base.full_attention` (additive causal mask);
- ``<method>`` at a setting, on a ``path``: ``reference`` (the method's eager reference),
  ``fast`` (the kernel the model runs, e.g. ``topk``'s gather), ``fused`` (FlexAttention,
  for the methods that have it). Calibrated methods use a fixed random orthonormal basis.

FLOPs are dense counts for dense kernels (the causal half is not skipped in the count,
whatever a fused kernel skips); sparse methods count the keys they attend.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown, full_attention_flops
from drrl_env.methods import make_method, method_class
from drrl_env.methods.base import CallShape, Setting, full_attention

PATHS = ("reference", "fast", "fused")


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
class KernelSpec:
    """Which method, setting and path a timed kernel runs."""

    method: str
    rank: int
    keep: float = 1.0
    path: str = "fast"

    @property
    def name(self) -> str:
        return self.method if self.path == "fast" else f"{self.method}[{self.path}]"


@dataclass(frozen=True)
class Kernel:
    """One timed attention kernel and its executed FLOPs."""

    name: str
    rank: int
    keep: float
    path: str
    call: Callable[[], torch.Tensor]
    flops: FlopsBreakdown
    dense_bytes: int
    """Bytes of the largest dense (B, H, L, L) tensors the kernel allocates (0: none)."""


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
    """A random orthonormal basis per head, shaped (1 layer, heads, d, d)."""
    gaussian = torch.randn(heads, head_dim, head_dim, generator=generator)
    return torch.linalg.qr(gaussian).Q[None].to(device)  # (1, heads, d, d)


def method_call(
    method, query, key, value, mask, scaling, setting: Setting, path: str
) -> Callable[[], torch.Tensor]:
    """A fresh-sequence layer call of ``method``: observe the keys, then run ``path``."""
    run = {"reference": method.reference, "fast": method.attend}.get(path)
    if path == "fused":
        run = method.fused
    if run is None:
        raise ValueError(f"path={path!r} is not one of {PATHS}")

    def call() -> torch.Tensor:
        state = method.new_state(0)
        method.observe(state, query, key)
        return run(state, query, key, value, mask, scaling, setting)

    return call


def attention_kernels(
    shape: AttentionShape,
    length: int,
    specs: Sequence[KernelSpec],
    device: torch.device,
    seed: int = 0,
) -> list[Kernel]:
    """``sdpa``, ``full`` and each of ``specs``, on the same inputs.

    The inputs are drawn from a generator seeded with ``seed + length``: Q, K, V, then the
    calibrated bases (per kv head and per query head).

    Raises:
        ValueError: An unknown method or path, or a setting out of range.
    """
    generator = torch.Generator().manual_seed(seed + length)
    d, heads, kv_heads = shape.head_dim, shape.heads, shape.kv_heads
    query = torch.randn(1, heads, length, d, generator=generator).to(device)  # (B, H, T, d)
    key = torch.randn(1, kv_heads, length, d, generator=generator).to(device)  # (B, Hkv, N, d)
    value = torch.randn(1, kv_heads, length, d, generator=generator).to(device)
    mask = causal_mask(length, query.dtype, device)  # (1, 1, T, N)
    scaling = d**-0.5
    bases = {
        "kv_head": random_basis(kv_heads, d, generator, device),
        "query_head": random_basis(heads, d, generator, device),
    }
    dense = 3 * 4 * heads * length * length  # scores, mask sum and weights, float32

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=heads != kv_heads
        )

    full = full_flops(shape, length)
    kernels = [
        Kernel("sdpa", d, 1.0, "fast", sdpa, full, 0),
        Kernel(
            "full",
            d,
            1.0,
            "reference",
            lambda: full_attention(query, key, value, mask, scaling),
            full,
            dense,
        ),
    ]
    call_shape = CallShape(length, length, d, heads, kv_heads)
    for spec in specs:
        cls = method_class(spec.method)
        kwargs = {"basis": bases[cls.scope]} if cls.needs_basis else {}
        method = make_method(spec.method, d, 1, **kwargs)
        setting = method.check_setting(Setting(spec.rank, spec.keep))
        call = method_call(method, query, key, value, mask, scaling, setting, spec.path)
        uses_dense = spec.path == "reference" or (spec.path == "fast" and method.dense_fast_path)
        kernels.append(
            Kernel(
                spec.name,
                spec.rank,
                spec.keep,
                spec.path,
                call,
                method.flops(call_shape, setting),
                dense if uses_dense else 0,
            )
        )
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

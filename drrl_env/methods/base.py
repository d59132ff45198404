"""The attention-method protocol: what one way of computing rank-controlled attention owns.

An :class:`AttentionMethod` turns one layer call (queries, keys, values of a segment over
the KV cache) and a :class:`Setting` (the rank the agent chose, and for sparse methods the
fraction of keys kept) into the attention output. It owns, per layer and sequence, a state
that it updates as keys enter the cache (:meth:`AttentionMethod.observe`, which also
returns the spectrum the observation shows), an eager reference kernel
(:meth:`AttentionMethod.reference`) and the kernel the model runs
(:meth:`AttentionMethod.attend`), and its executed FLOPs for every stage
(:meth:`AttentionMethod.flops`). The observation's features are executed work too: they
are counted in the ``features`` stage at every call, whatever the setting.

Most methods have a static cost: their FLOPs and kept keys are functions of the call shape
and the setting alone (:attr:`AttentionMethod.static_cost`). A method whose work depends on
the data (``topp`` keeps as many keys as the estimated attention mass asks for) reports an
upper bound from :meth:`AttentionMethod.flops` and :meth:`AttentionMethod.kept_total`, and
the realised counts of its last call from :meth:`AttentionMethod.executed_flops`,
:meth:`AttentionMethod.executed_kept` and :meth:`AttentionMethod.sweep_costs`.

Shapes (nanoGPT style): queries ``(B, H, T, d)``; keys and values ``(B, Hkv, N, d)``,
un-repeated for grouped-query attention; the additive mask ``(B, 1, T, N)``. ``T``
queries are the last ``T`` of the ``N`` keys (causal): query ``i`` sees ``N - T + i + 1``
keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown, full_attention_flops


@dataclass(frozen=True)
class Setting:
    """What the agent decides for one layer and segment.

    Attributes:
        rank: Inner dimension of the query-key scores (or of the key selection), ``1..d``.
        keep: Fraction of each query's causal keys attended exactly (sparse methods);
            1 keeps every key. ``rank == d`` with ``keep == 1`` is exact attention. For
            ``topp`` it is the attention mass ``p`` the kept keys must reach (0 allowed).
    """

    rank: int
    keep: float = 1.0

    def is_exact(self, head_dim: int) -> bool:
        """Whether this setting runs exact (full) attention."""
        return self.rank == head_dim and self.keep >= 1.0

    def label(self) -> str:
        """A short name: ``r16`` or ``r16k0.5``."""
        return f"r{self.rank}" if self.keep >= 1.0 else f"r{self.rank}k{self.keep:g}"


@dataclass(frozen=True)
class CallShape:
    """The shape of one layer call, all FLOPs counts are functions of it.

    Attributes:
        queries: Queries ``T`` (the segment).
        keys: Keys ``N`` visible (the KV cache including the segment).
        head_dim: Head dimension ``d``.
        heads: Query heads ``H``.
        kv_heads: Key/value heads ``Hkv`` (divides ``H``).
        new_keys: Keys that entered the cache with this call (``T`` over a KV cache).
        batch: Sequences in the batch (counts scale linearly).
    """

    queries: int
    keys: int
    head_dim: int
    heads: int = 1
    kv_heads: int = 1
    new_keys: int | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("queries", "keys", "head_dim", "heads", "kv_heads", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.queries > self.keys:
            raise ValueError(f"queries={self.queries} exceed keys={self.keys} (causal call)")
        if self.new_keys is None:
            object.__setattr__(self, "new_keys", self.queries)
        elif not 0 <= self.new_keys <= self.keys:
            raise ValueError(f"new_keys must be in 0..{self.keys}, got {self.new_keys!r}")

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def causal_keys(self) -> np.ndarray:
        """Keys visible to each query, shape (T,): ``N - T + i + 1``."""
        return np.arange(self.keys - self.queries + 1, self.keys + 1, dtype=np.int64)

    @property
    def causal_total(self) -> int:
        """Keys exact attention attends, summed over sequences, query heads and queries."""
        return self.batch * self.heads * int(self.causal_keys().sum())

    @classmethod
    def of(cls, query: torch.Tensor, key: torch.Tensor, new_keys: int | None = None) -> CallShape:
        """The shape of a call with ``query`` (B, H, T, d) and ``key`` (B, Hkv, N, d)."""
        batch, heads, queries, head_dim = query.shape
        return cls(queries, key.shape[2], head_dim, heads, key.shape[1], new_keys, batch)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, d) -> (B, Hkv * groups, N, d), each kv head repeated for its query heads."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    expanded = states[:, :, None].expand(batch, kv_heads, groups, length, dim)
    return expanded.reshape(batch, kv_heads * groups, length, dim)


def softmax_output(
    scores: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Masked softmax of ``scores`` (B, H, T, N) applied to ``value`` (B, H, N, d)."""
    if mask is not None:
        scores = scores + mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(weights, value)  # (B, H, T, d)


def full_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Reference attention, the same operations as transformers' eager path.

    Args:
        query: (B, H, T, d). key, value: (B, Hkv, N, d), un-repeated.
        mask: additive float mask (B, 1, T, N) or None.
        scaling: score scale, usually ``d ** -0.5``.

    Returns:
        (B, H, T, d).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, N)
    return softmax_output(scores, value, mask)


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Exact attention through torch's fused SDPA: the fast path of :func:`full_attention`.

    Same arguments and result as :func:`full_attention` up to float rounding (a test checks
    the two agree); grouped-query heads are expanded inside the fused kernel.
    """
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )


def lowrank_scores_attention(
    query_proj: torch.Tensor,
    key_proj: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention from projected queries (B, H, T, r) and keys (B, H, N, r); value (B, H, N, d).

    Scores are computed at inner dimension ``r``; ``A V`` at the full head dim.
    """
    scores = torch.matmul(query_proj, key_proj.transpose(2, 3)) * scaling  # (B, H, T, N)
    return softmax_output(scores, value, mask)


def core_flops(queries: int, keys: int, head_dim: int, inner: int, heads: int) -> FlopsBreakdown:
    """Dense scores at inner dimension ``inner``, softmax and ``A V``, summed over heads."""
    return FlopsBreakdown(
        scores=2 * queries * keys * inner * heads,
        softmax=5 * queries * keys * heads,
        output=2 * queries * keys * head_dim * heads,
    )


def exact_flops(shape: CallShape) -> FlopsBreakdown:
    """FLOPs of exact attention on ``shape`` (dense count, every query head, every sequence)."""
    one = full_attention_flops(shape.queries, shape.keys, shape.head_dim, shape.heads)
    return one.scaled(shape.batch)


def normalized_energy(energy: torch.Tensor) -> np.ndarray:
    """Mean over leading axes of per-row energies (..., d) normalised to sum 1, as (d,).

    The order of the last axis is kept (the order in which a truncation keeps directions);
    negative round-off is clipped, an all-zero row counts as uniform.
    """
    rows = energy.detach().double().cpu().reshape(-1, energy.shape[-1]).clamp_min(0.0)
    totals = rows.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(rows, 1.0 / rows.shape[-1])
    rows = torch.where(totals > 0, rows / totals.clamp_min(1e-300), uniform)
    mean = rows.mean(dim=0).numpy()
    return mean / mean.sum()


class AttentionMethod:
    """Base class of the attention methods; one instance serves every layer of one model.

    Subclasses set :attr:`name`, :attr:`description` and override :meth:`observe`,
    :meth:`reference`, :meth:`feature_flops` and :meth:`setting_flops` (and :meth:`attend`
    when they have a faster path than the reference). A setting that
    :meth:`Setting.is_exact` always runs exact attention.

    Args:
        head_dim: Head dimension ``d`` of the model.
        n_layers: Attention layers of the model.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_keep: ClassVar[bool] = False
    """Whether ``Setting.keep < 1`` means something (sparse methods)."""
    needs_basis: ClassVar[bool] = False
    """Whether the method needs calibrated bases (``basis=``, of :attr:`scope`)."""
    scope: ClassVar[str | None] = None
    """Which calibrated bases: ``query_head`` or ``kv_head`` (drrl_env.lm.calibration)."""
    version: ClassVar[int] = 1
    """Revision of what the method computes; caches of its results are keyed on it."""
    static_cost: ClassVar[bool] = True
    """Whether executed FLOPs and kept keys are functions of (call shape, setting) alone.

    When False, :meth:`flops` and :meth:`kept_total` are upper bounds and the realised
    counts of a call come from :meth:`executed_flops` and :meth:`executed_kept`.
    """
    keep_allows_zero: ClassVar[bool] = False
    """Whether ``Setting.keep == 0`` is a valid setting (``topp``: the fewest keys only)."""
    selects_at_full_rank: ClassVar[bool] = False
    """Whether an environment's grid offers rank ``d`` with ``keep < 1`` (selection on exact
    scores, the upper bound of a selecting method)."""
    default_keeps: ClassVar[tuple[float, ...] | None] = None
    """The keep values of an environment's grid when the config names none (sparse
    methods; None: ``drrl_env.envs.config.DEFAULT_KEEP``)."""
    dense_fast_path: ClassVar[bool] = True
    """Whether the fast path materialises dense (H, T, N) score tensors (the kernel
    benchmarks skip such paths beyond a memory limit); False for the selecting methods."""
    low_rank_scores: ClassVar[bool] = False
    """Whether the method is dense attention with rank-``r`` scores, so that only the scores
    shrink with the rank (``gram``, ``svd``, ``calibrated``: the ceiling of
    ``experiments/flops_scaling.py``)."""

    def __init__(self, head_dim: int, n_layers: int) -> None:
        self.head_dim = int(head_dim)
        self.n_layers = int(n_layers)

    # -- settings --------------------------------------------------------------------------

    def check_setting(self, setting: Setting) -> Setting:
        """``setting`` checked against the head dim; ValueError naming the bad field."""
        rank, keep = setting.rank, setting.keep
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
            raise ValueError(f"rank={rank!r} must be an integer in 1..{self.head_dim}")
        if not 1 <= rank <= self.head_dim:
            raise ValueError(f"rank={rank!r} must be an integer in 1..{self.head_dim}")
        allowed = "[0, 1]" if self.keep_allows_zero else "(0, 1]"
        if isinstance(keep, bool) or not isinstance(keep, int | float):
            raise ValueError(f"keep={keep!r} must be a number in {allowed}")
        if not ((0 <= keep if self.keep_allows_zero else 0 < keep) and keep <= 1):
            raise ValueError(f"keep={keep!r} must be a number in {allowed}")
        if keep < 1 and not self.uses_keep:
            raise ValueError(f"method {self.name!r} keeps every key: keep must be 1, got {keep}")
        return Setting(int(rank), float(keep))

    # -- state -----------------------------------------------------------------------------

    def new_state(self, layer: int) -> dict[str, Any]:
        """A fresh per-(sequence, layer) state; ``seen`` counts keys already observed."""
        return {"layer": layer, "seen": 0}

    @staticmethod
    def new_keys(state: dict[str, Any], key: torch.Tensor) -> torch.Tensor:
        """The keys (B, Hkv, n, d) that entered the cache since the last call.

        Over a KV cache these are the last ``N - seen``; a call with no more keys than seen
        before starts a new sequence (all keys are new) and clears the method's state.
        ``state["fresh"]`` records ``n`` (the ``new_keys`` of the call's FLOPs).
        """
        total = key.shape[2]
        if state["seen"] and state["seen"] < total:
            fresh = key[:, :, state["seen"] :]
        else:
            layer = state["layer"]
            state.clear()
            state.update({"layer": layer, "seen": 0})
            fresh = key
        state["seen"], state["fresh"] = total, fresh.shape[2]
        return fresh

    # -- the three things a method does ----------------------------------------------------

    def observe(self, state: dict[str, Any], query: torch.Tensor, key: torch.Tensor) -> np.ndarray:
        """Take in this call's new keys and return the spectrum the observation shows.

        Returns:
            (d,) float64 energies summing to 1, in the order a rank-r truncation keeps them
            (the first ``r`` entries are what rank ``r`` retains).
        """
        self.new_keys(state, key)
        return np.full(self.head_dim, 1.0 / self.head_dim)

    def reference(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        setting: Setting,
    ) -> torch.Tensor:
        """Eager reference kernel: (B, H, T, d) output of ``setting``."""
        return full_attention(query, key, value, mask, scaling)

    def attend(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        setting: Setting,
    ) -> torch.Tensor:
        """The kernel the model runs; by default exact attention through SDPA when exact."""
        if setting.is_exact(self.head_dim):
            return exact_attention(query, key, value, mask, scaling)
        return self.reference(state, query, key, value, mask, scaling, setting)

    has_fused: ClassVar[bool] = False
    """Whether :meth:`fused` has a FlexAttention path."""

    def fused(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        setting: Setting,
    ) -> torch.Tensor:
        """The setting through a fused FlexAttention kernel (one causal sequence).

        Raises:
            NotImplementedError: The method has no fused path.
        """
        raise NotImplementedError(f"method {self.name!r} has no fused path")

    def sweep_outputs(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        settings: list[Setting],
    ) -> list[torch.Tensor]:
        """Outputs of every setting of ``settings`` for one call (teacher-forced sweeps).

        Measurements, not executed work: a method may share computation across settings
        (its reference path); by default each setting runs :meth:`reference`.
        """
        return [
            self.reference(state, query, key, value, mask, scaling, setting) for setting in settings
        ]

    # -- FLOPs -----------------------------------------------------------------------------

    def feature_flops(self, shape: CallShape) -> FlopsBreakdown:
        """FLOPs of :meth:`observe` (paid at every call, whatever the setting)."""
        return FlopsBreakdown()

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        """FLOPs of running ``setting`` once the features are computed (not exact)."""
        return exact_flops(shape)

    def flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        """Executed FLOPs of one call at ``setting``: features plus the setting's kernel.

        For a method without :attr:`static_cost` an upper bound (what static cost tables
        and budgets use); the realised count of a call is :meth:`executed_flops`.
        """
        setting = self.check_setting(setting)
        run = (
            exact_flops(shape)
            if setting.is_exact(self.head_dim)
            else self.setting_flops(shape, setting)
        )
        return self.feature_flops(shape) + run

    def kept_total(self, shape: CallShape, setting: Setting) -> int:
        """Keys attended exactly, summed over sequences, query heads and queries.

        The default keeps every causal key. For a method without :attr:`static_cost`, an
        upper bound (the realised count is :meth:`executed_kept`).
        """
        self.check_setting(setting)
        return shape.causal_total

    def executed_flops(
        self, state: dict[str, Any], shape: CallShape, setting: Setting
    ) -> FlopsBreakdown:
        """Realised FLOPs of the last :meth:`attend` call made with ``state`` at ``setting``.

        Static methods: :meth:`flops`.
        """
        return self.flops(shape, setting)

    def executed_kept(self, state: dict[str, Any], shape: CallShape, setting: Setting) -> int:
        """Realised kept total (as :meth:`kept_total`) of the last :meth:`attend` with ``state``.

        Static methods: :meth:`kept_total`.
        """
        return self.kept_total(shape, setting)

    def sweep_costs(
        self, state: dict[str, Any], shape: CallShape, settings: list[Setting]
    ) -> list[tuple[FlopsBreakdown, int]]:
        """Realised (FLOPs, kept total) of each of ``settings`` after :meth:`sweep_outputs`.

        Static methods: (:meth:`flops`, :meth:`kept_total`) of each setting.
        """
        return [(self.flops(shape, s), self.kept_total(shape, s)) for s in settings]


def check_option(name: str, value: object) -> int:
    """A method option that must be an int >= 1 (ValueError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def kept_keys(causal: np.ndarray, keep: float, min_keys: int, window: int | None = None):
    """Keys each query attends exactly, ``min(n_i, max(min_keys, ceil(keep * m)))``.

    ``m`` is ``window`` (the keys the whole segment sees) when given, else the query's own
    ``n_i`` causal keys.
    """
    base = causal if window is None else np.full_like(causal, window)
    wanted = np.maximum(min_keys, np.ceil(keep * base - 1e-9).astype(np.int64))
    return np.minimum(causal, wanted)

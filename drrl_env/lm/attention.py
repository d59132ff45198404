"""Rank-controlled attention: the ``drrl`` kernel and the per-layer controller behind it.

The kernel is a free function with the signature of ``transformers.AttentionInterface``;
projections, RoPE, the KV cache and the output projection stay in the model. Until a
:class:`RankController` is attached to a model the kernel computes plain eager attention.

Low-rank scores are always computed at inner dimension ``r``: ``(Q P)(K P)^T`` with an
orthonormal basis ``P`` of shape ``(d, r)``. Full-size rank-r copies of Q and K are never
built. Ways to find ``P`` (the ``method``):

- ``gram``: top-r eigenvectors of ``G = Q^T Q + K^T K`` per query head; ``K^T K`` is
  accumulated segment by segment over the KV cache.
- ``svd``: separate truncated SVDs of Q and K (the DR-RL paper's Eq. 13); scores are
  ``(Q V_q)(V_q^T V_k)(K V_k)^T``.
- ``calibrated``: a fixed basis per layer and head estimated offline
  (:mod:`drrl_env.lm.calibration`).
- ``full``: full-rank attention whatever the rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from drrl_env.flops import METHODS, FlopsBreakdown, full_attention_flops, lowrank_attention_flops
from drrl_env.spectra import normalize_spectrum

ATTENTION_NAME = "drrl"
INPUT_STAT_NAMES = ("input_rms", "consecutive_cosine", "norm_spread")


def check_rank(rank: int, head_dim: int) -> int:
    """``rank`` as int, or ValueError unless it is an integer in 1..head_dim."""
    if isinstance(rank, bool) or not 1 <= int(rank) <= head_dim or int(rank) != rank:
        raise ValueError(f"rank={rank!r} must be an integer in 1..{head_dim}")
    return int(rank)


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


def lowrank_projected_attention(
    query_basis_proj: torch.Tensor,
    key_basis_proj: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention from projected queries (B, H, T, r) and keys (B, H, N, r); value (B, H, N, d)."""
    scores = torch.matmul(query_basis_proj, key_basis_proj.transpose(2, 3)) * scaling
    return softmax_output(scores, value, mask)


def svd_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rank: int,
) -> torch.Tensor:
    """The paper's Eq. 13: scores from separate rank-r truncated SVDs of Q and K, at inner dim r."""
    groups = query.shape[1] // key.shape[1]
    query_right = torch.linalg.svd(query, full_matrices=False).Vh[..., :rank, :]  # (B, H, r, d)
    key_right = torch.linalg.svd(key, full_matrices=False).Vh[..., :rank, :]  # (B, Hkv, r, d)
    key_proj = torch.matmul(key, key_right.transpose(-1, -2))  # (B, Hkv, N, r)
    core = torch.matmul(query_right, repeat_kv(key_right, groups).transpose(-1, -2))  # (B,H,r,r)
    query_proj = torch.matmul(torch.matmul(query, query_right.transpose(-1, -2)), core)
    return lowrank_projected_attention(
        query_proj, repeat_kv(key_proj, groups), repeat_kv(value, groups), mask, scaling
    )


def basis_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    basis: torch.Tensor,
) -> torch.Tensor:
    """Scores ``(Q P)(K P)^T`` with a per-query-head orthonormal basis ``P`` (.., H, d, r)."""
    groups = query.shape[1] // key.shape[1]
    query_proj = torch.matmul(query, basis)  # (B, H, T, r)
    key_proj = torch.matmul(repeat_kv(key, groups), basis)  # (B, H, N, r)
    return lowrank_projected_attention(
        query_proj, key_proj, repeat_kv(value, groups), mask, scaling
    )


def output_cosine(lowrank: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over tokens of the cosine between outputs (B, H, T, d), heads concatenated."""
    a = lowrank.transpose(1, 2).flatten(2)  # (B, T, H*d)
    b = reference.transpose(1, 2).flatten(2)
    return float(F.cosine_similarity(a, b, dim=-1, eps=1e-12).mean())


def input_statistics(hidden: torch.Tensor) -> np.ndarray:
    """Bounded statistics of a layer input (B, T, D): the sequence dynamics ``h_t``.

    Returns ``[rms / (1 + rms), mean cosine of consecutive tokens, spread / (1 + spread)]``
    where ``spread`` is the coefficient of variation of the token norms.
    """
    norms = hidden.float().norm(dim=-1)  # (B, T)
    rms = float(norms.pow(2).mean().sqrt() / hidden.shape[-1] ** 0.5)
    consecutive = (
        float(F.cosine_similarity(hidden[:, 1:], hidden[:, :-1], dim=-1).mean())
        if hidden.shape[1] > 1
        else 1.0
    )
    spread = float(norms.std(unbiased=False) / norms.mean().clamp_min(1e-12))
    return np.array([rms / (1 + rms), consecutive, spread / (1 + spread)], dtype=np.float64)


@dataclass(frozen=True)
class LayerRequest:
    """What a rank decision may look at, for one layer on one segment, before it runs."""

    layer: int
    queries: int
    keys: int
    spectrum: np.ndarray  # (d,) normalised eigenvalues of Q^T Q + K^T K, mean over heads
    input_stats: np.ndarray  # (3,), see INPUT_STAT_NAMES


@dataclass
class LayerRecord:
    """What one call of the kernel did."""

    layer: int
    rank: int
    method: str
    queries: int
    keys: int
    flops: FlopsBreakdown
    flops_full: FlopsBreakdown
    fidelity: float = 1.0
    spectrum: np.ndarray | None = None
    input_stats: np.ndarray | None = None
    sweep_fidelity: np.ndarray | None = None  # (len(sweep_ranks),)


@dataclass
class _LayerState:
    key_gram: torch.Tensor | None = None  # (B, Hkv, d, d), sum of K^T K over all keys seen
    key_count: int = 0
    method_key_count: int = 0  # keys covered by the Gram the gram method itself maintained
    hidden: torch.Tensor | None = None
    gram_sum: torch.Tensor | None = None  # (H, d, d), calibration accumulator


@dataclass
class RankController:
    """Chooses and executes the rank of every attention layer it is attached to.

    Args:
        n_layers: Number of attention layers of the model.
        head_dim: Head dimension ``d``.
        method: One of ``full``, ``svd``, ``gram``, ``calibrated``.
        ranks: Rank per layer (or one rank for all) used when ``decide`` is None.
        decide: Called with a :class:`LayerRequest` before each layer runs; returns the rank.
        record: Append a :class:`LayerRecord` (fidelity vs full rank, spectrum, FLOPs)
            per call to ``records``.
        sweep_ranks: Also measure the fidelity of each of these ranks (teacher forcing:
            the layer's output stays full rank).
        basis: (n_layers, H, d, d) calibrated bases, columns by decreasing energy.
        collect_gram: Accumulate ``Q^T Q + K^T K`` per layer and head (calibration).
        on_record: Called with each new :class:`LayerRecord`.
    """

    n_layers: int
    head_dim: int
    method: str = "gram"
    ranks: int | Sequence[int] | None = None
    decide: Callable[[LayerRequest], int] | None = None
    record: bool = True
    sweep_ranks: Sequence[int] | None = None
    basis: torch.Tensor | None = None
    collect_gram: bool = False
    on_record: Callable[[LayerRecord], None] | None = None
    records: list[LayerRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.method == "calibrated" and self.basis is None:
            raise ValueError("method='calibrated' needs basis= (see drrl_env.lm.calibration)")
        if self.method == "calibrated":
            shape = tuple(self.basis.shape)
            if len(shape) != 4 or shape[0] != self.n_layers or shape[2:] != (self.head_dim,) * 2:
                raise ValueError(
                    f"basis has shape {shape}, expected (layers, heads, d, d) with "
                    f"layers={self.n_layers}, d={self.head_dim}: a basis of another model?"
                )
        for rank in self._rank_list() + list(self.sweep_ranks or []):
            self.check_rank(rank)
        self._states = [_LayerState() for _ in range(self.n_layers)]
        self._hooks: list = []

    def _rank_list(self) -> list[int]:
        if self.ranks is None:
            return []
        if np.ndim(self.ranks) == 0:
            return [self.ranks]
        if len(self.ranks) != self.n_layers:
            raise ValueError(
                f"ranks has {len(self.ranks)} entries, the model {self.n_layers} layers"
            )
        return list(self.ranks)  # not int(r): 2.5 must fail the rank check, not become 2

    def check_rank(self, rank: int) -> int:
        """``rank`` as int, or ValueError unless it is in 1..head_dim."""
        return check_rank(rank, self.head_dim)

    def rank_of_layer(self, layer: int) -> int:
        """The fixed rank of ``layer`` (full rank when no ranks are set)."""
        if self.ranks is None:
            return self.head_dim
        return int(self.ranks) if np.ndim(self.ranks) == 0 else int(self.ranks[layer])

    # -- attaching -----------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> RankController:
        """Route every attention layer of ``model`` through this controller."""
        self.detach(model)
        modules = attention_modules(model)
        if len(modules) != self.n_layers:
            raise ValueError(f"model has {len(modules)} attention layers, expected {self.n_layers}")
        for module in modules:
            module.drrl_controller = self
            self._hooks.append(module.register_forward_pre_hook(self._grab_input, with_kwargs=True))
        return self

    def detach(self, model: torch.nn.Module) -> None:
        """Give ``model`` back its plain attention."""
        for module in attention_modules(model):
            if getattr(module, "drrl_controller", None) is self:
                del module.drrl_controller
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _grab_input(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._states[module.layer_idx].hidden = hidden

    def reset(self) -> None:
        """Start a new sequence: forget accumulated key Grams and records."""
        self._states = [_LayerState() for _ in range(self.n_layers)]
        self.records.clear()

    # -- the kernel ------------------------------------------------------------------------

    def _key_gram(self, state: _LayerState, key: torch.Tensor, queries: int) -> torch.Tensor:
        keys = key.shape[2]
        fresh = key[:, :, keys - queries :] if state.key_count == keys - queries else key
        update = torch.matmul(fresh.transpose(-1, -2), fresh)  # (B, Hkv, d, d)
        if state.key_gram is not None and fresh.shape[2] != keys:
            state.key_gram = state.key_gram + update
        else:
            state.key_gram = update
        state.key_count = keys
        return state.key_gram

    def _gram_eigen(self, state, query, key) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (B, H, d) and eigenvectors (B, H, d, d), both by decreasing eigenvalue."""
        groups = query.shape[1] // key.shape[1]
        key_gram = repeat_kv(self._key_gram(state, key, query.shape[2]), groups)
        gram = torch.matmul(query.transpose(-1, -2), query) + key_gram  # (B, H, d, d)
        if self.collect_gram:
            summed = gram.sum(dim=0)
            state.gram_sum = summed if state.gram_sum is None else state.gram_sum + summed
        values, vectors = torch.linalg.eigh(gram)
        return values.flip(-1), vectors.flip(-1)

    def executed_flops(self, layer: int, query, key, rank: int) -> FlopsBreakdown:
        """Executed FLOPs of ``rank`` at ``layer``; updates the gram method's own key count."""
        batch, heads, queries, _ = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        state = self._states[layer]
        covered = state.method_key_count
        new_keys = keys - covered if covered and covered <= keys else keys
        if self.method == "gram" and rank < self.head_dim:
            state.method_key_count = keys
        else:
            state.method_key_count = 0
        one = lowrank_attention_flops(
            queries, keys, self.head_dim, rank, self.method, heads, kv_heads, new_keys=new_keys
        )
        return scale_flops(one, batch)

    def attend(self, layer, query, key, value, mask, scaling) -> torch.Tensor:
        """Run one layer: decide the rank, execute it, record what happened."""
        state = self._states[layer]
        want_spectrum = self.record or self.decide is not None or self.collect_gram
        need_gram = want_spectrum or self.method == "gram"
        values, vectors = self._gram_eigen(state, query, key) if need_gram else (None, None)
        spectrum = _mean_spectrum(values) if want_spectrum else None
        stats = (
            input_statistics(state.hidden) if want_spectrum and state.hidden is not None else None
        )
        if self.decide is not None:
            request = LayerRequest(layer, query.shape[2], key.shape[2], spectrum, stats)
            rank = self.check_rank(self.decide(request))
        else:
            rank = self.rank_of_layer(layer)
        output = self._execute(layer, query, key, value, mask, scaling, rank, vectors)
        flops = self.executed_flops(layer, query, key, rank)
        if self.record:
            self._record(layer, query, key, value, mask, scaling, rank, output, vectors, flops)
            self.records[-1].spectrum, self.records[-1].input_stats = spectrum, stats
            if self.on_record is not None:
                self.on_record(self.records[-1])
        state.hidden = None
        return output

    def _execute(self, layer, query, key, value, mask, scaling, rank, vectors) -> torch.Tensor:
        if self.method == "full" or rank == self.head_dim:
            return full_attention(query, key, value, mask, scaling)
        if self.method == "svd":
            return svd_attention(query, key, value, mask, scaling, rank)
        basis = vectors if self.method == "gram" else self.basis[layer].to(query)[None]
        return basis_attention(query, key, value, mask, scaling, basis[..., :rank])

    def _record(self, layer, query, key, value, mask, scaling, rank, output, vectors, flops):
        reference = (
            output
            if rank == self.head_dim or self.method == "full"
            else full_attention(query, key, value, mask, scaling)
        )
        batch, heads, queries, _ = query.shape
        record = LayerRecord(
            layer=layer,
            rank=rank,
            method=self.method,
            queries=queries,
            keys=key.shape[2],
            flops=flops,
            flops_full=scale_flops(
                full_attention_flops(queries, key.shape[2], self.head_dim, heads), batch
            ),
            fidelity=1.0 if reference is output else output_cosine(output, reference),
        )
        if self.sweep_ranks is not None:
            record.sweep_fidelity = np.array(
                [
                    output_cosine(
                        self._execute(layer, query, key, value, mask, scaling, r, vectors),
                        reference,
                    )
                    if r < self.head_dim and self.method != "full"
                    else 1.0
                    for r in self.sweep_ranks
                ]
            )
        self.records.append(record)

    def calibration_grams(self) -> list[torch.Tensor | None]:
        """Per layer, the accumulated (H, d, d) sum of ``Q^T Q + K^T K``."""
        return [state.gram_sum for state in self._states]


def _mean_spectrum(values: torch.Tensor) -> np.ndarray:
    """Normalised spectrum (d,) averaged over batch and heads of eigenvalues (B, H, d)."""
    per_head = normalize_spectrum(values.detach().double().cpu().numpy())
    mean = per_head.reshape(-1, per_head.shape[-1]).mean(axis=0)
    return mean / mean.sum()


def scale_flops(flops: FlopsBreakdown, factor: int) -> FlopsBreakdown:
    """``flops`` repeated ``factor`` times (a batch of identical problems)."""
    total = flops
    for _ in range(factor - 1):
        total = total + flops
    return total


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a transformers model, by layer index."""
    found = [
        module
        for module in model.modules()
        if hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention")
    ]
    return sorted(found, key=lambda module: module.layer_idx)


def drrl_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``transformers.AttentionInterface`` kernel: eager attention, or the attached controller's.

    Args:
        module: The attention module (its ``layer_idx`` selects the controller's layer).
        query: (B, H, T, d). key, value: (B, Hkv, N, d), not repeated for grouped-query.
        attention_mask: Additive float mask (B, 1, T, N) from the ``drrl`` mask function.
        scaling: Score scale; defaults to ``d ** -0.5``.
        dropout: Must be 0 (frozen models run in eval mode).

    Returns:
        The attention output (B, T, H, d) and no attention weights.
    """
    if dropout:
        raise ValueError("the drrl kernel runs frozen models only: dropout must be 0")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    controller: RankController | None = getattr(module, "drrl_controller", None)
    if controller is None:
        output = full_attention(query, key, value, attention_mask, scaling)
    else:
        output = controller.attend(module.layer_idx, query, key, value, attention_mask, scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, drrl_attention)
# Without a mask function under the same name the padding mask would arrive as None.
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)

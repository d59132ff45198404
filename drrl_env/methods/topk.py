"""``topk``: rank-guided sparse attention (after Loki, arXiv 2406.02542).

The scores at the chosen rank, in the fixed rotated basis of ``calibrated-kv``, only
*select* each query's most relevant keys: ``keep`` times the ``N`` keys visible to the
segment, never fewer than ``min_keys``, all of a query's causal keys when it has fewer
(``keep_of="query"``: ``keep`` times the query's own causal keys instead). Exact attention
then runs on the selected keys only. The agent still picks the rank (the quality of the
selection); ``keep`` comes with the setting. Executed FLOPs per query head, with ``k_i``
keys kept by query ``i``:
``2 T d r`` (rotate queries) + ``2 T N r`` (selection scores) + ``T N`` (selection) +
``sum_i (4 k_i d + 5 k_i)`` (exact attention on the kept keys), plus the rotation of each
new key once (``features``). Queries run in chunks of ``query_chunk``: within a chunk every
query gathers as many keys as the chunk's largest ``k_i`` (the extra ones masked), and the
count includes that padding, because it is executed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods.base import (
    CallShape,
    Setting,
    ceil_div,
    check_option,
    kept_keys,
    repeat_kv,
)
from drrl_env.methods.calibrated import KVHeadCalibratedMethod

MIN_KEYS = 64
"""Fewest keys a query attends exactly (all of them when it has fewer)."""
QUERY_CHUNK = 64
"""Queries whose keys are gathered together (bounds the gathered tensor's memory)."""
KEEP_OF = ("window", "query")
"""What ``keep`` is a fraction of: the keys the segment sees, or each query's causal keys."""


def allowed_keys(mask: torch.Tensor | None, batch: int, queries: int, keys: int) -> torch.Tensor:
    """Keys each query may attend (B, 1, T), read off the additive mask (0 = allowed)."""
    if mask is None:
        return torch.full((batch, 1, queries), keys, dtype=torch.long)
    threshold = torch.finfo(mask.dtype).min / 2
    return (mask > threshold).sum(dim=-1).expand(batch, 1, queries).long()


class SelectingMethod(KVHeadCalibratedMethod):
    """Base of the methods whose rank-r scores only select keys (``topk``, ``topp``,
    ``topk-block``): the scores use the fixed rotated bases of ``calibrated-kv``, and exact
    attention runs on the selected keys.

    Args:
        head_dim: Head dimension ``d``.
        n_layers: Attention layers.
        basis: (layers, kv heads, d, d) calibrated bases (as for ``calibrated-kv``).
        min_keys: Fewest keys a query attends (all of them when it has fewer).
        query_chunk: Queries selected (and attended) together.
    """

    low_rank_scores = False
    uses_keep = True
    dense_fast_path = False
    """The kernel the model runs never builds (H, T, N) tensors."""

    def __init__(
        self,
        head_dim: int,
        n_layers: int,
        basis: torch.Tensor | None = None,
        min_keys: int = MIN_KEYS,
        query_chunk: int = QUERY_CHUNK,
    ) -> None:
        super().__init__(head_dim, n_layers, basis)
        self.min_keys = check_option("min_keys", min_keys)
        self.query_chunk = check_option("query_chunk", query_chunk)


class TopKMethod(SelectingMethod):
    """Rank-r selection scores choose each query's keys; exact attention on those only.

    Args:
        head_dim, n_layers, basis, min_keys, query_chunk: As for :class:`SelectingMethod`.
        keep_of: What ``keep`` is a fraction of (:data:`KEEP_OF`).
    """

    name = "topk"
    description = "rank-r scores pick keep x the segment's keys per query; exact attention on them"
    version = 2  # keep is a fraction of the segment's keys by default

    def __init__(self, *args, keep_of: str = "window", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if keep_of not in KEEP_OF:
            raise ValueError(f"keep_of={keep_of!r} is not one of {KEEP_OF}")
        self.keep_of = keep_of

    # -- selection (shared by every path, so they select the same keys) --------------------

    def ranked(self, state, query, mask, rank: int, keeps):
        """Per query chunk: (start, stop, indices (B, H, Tc, k), {keep: counts (B, 1, Tc)}).

        ``indices`` are each query's keys by decreasing selection score at ``rank``, as many
        as the chunk's largest count over ``keeps``; a query keeping ``k_i`` keys attends
        the first ``k_i`` of its row.
        """
        query_proj, key_proj = self.rotated(state, query, rank)  # (B,H,T,r), (B,H,N,r)
        batch, _, queries, _ = query.shape
        allowed = allowed_keys(mask, batch, queries, key_proj.shape[2]).to(query.device)
        base = allowed if self.keep_of == "query" else torch.full_like(allowed, key_proj.shape[2])
        kept = {
            keep: torch.minimum(
                allowed, torch.ceil(base.double() * keep - 1e-9).long().clamp_min(self.min_keys)
            )
            for keep in keeps
        }  # keep -> (B, 1, T)
        for start in range(0, queries, self.query_chunk):
            stop = min(start + self.query_chunk, queries)
            scores = torch.matmul(query_proj[:, :, start:stop], key_proj.transpose(2, 3))
            if mask is not None:
                scores = scores + mask[:, :, start:stop]  # (B, H, Tc, N)
            counts = {keep: k[:, :, start:stop] for keep, k in kept.items()}
            k_max = max(int(c.max()) for c in counts.values())
            yield start, stop, scores.topk(k_max, dim=-1).indices, counts

    def select(self, state, query, mask, setting: Setting):
        """Per query chunk: (start, stop, indices (B, H, Tc, k_max), valid (B, 1, Tc, k_max)).

        ``valid`` marks the first ``k_i`` of each query's row (the rest is padding up to the
        chunk's largest ``k_i``).
        """
        for start, stop, indices, counts in self.ranked(
            state, query, mask, setting.rank, [setting.keep]
        ):
            count = counts[setting.keep]  # (B, 1, Tc)
            k_max = int(count.max())
            valid = torch.arange(k_max, device=query.device) < count[..., None]
            yield start, stop, indices[..., :k_max], valid

    # -- kernels ---------------------------------------------------------------------------

    def _dense(self, query, key, value, mask, scaling):
        """Exact scores (B, H, T, N) with the mask, and the repeated values (B, H, N, d)."""
        groups = query.shape[1] // key.shape[1]
        scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling
        if mask is not None:
            scores = scores + mask
        return scores, repeat_kv(value, groups)

    @staticmethod
    def _masked_output(scores, values, selected) -> torch.Tensor:
        weights = F.softmax(
            scores.masked_fill(~selected, float("-inf")), dim=-1, dtype=torch.float32
        )
        return torch.matmul(weights.to(values.dtype), values)  # (B, H, T, d)

    def reference(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """Dense eager reference: exact scores, every key not selected masked out."""
        if setting.is_exact(self.head_dim):
            return super().reference(state, query, key, value, mask, scaling, setting)
        return self.sweep_outputs(state, query, key, value, mask, scaling, [setting])[0]

    def sweep_outputs(self, state, query, key, value, mask, scaling, settings) -> list:
        """Outputs of ``settings`` (dense reference path; exact scores computed once)."""
        scores, values = self._dense(query, key, value, mask, scaling)
        outputs: dict[int, torch.Tensor] = {}
        ranks = sorted({s.rank for s in settings if not s.is_exact(self.head_dim)})
        for rank in ranks:
            mine = [(i, s) for i, s in enumerate(settings) if s.rank == rank and s.keep < 1]
            mine += [(i, s) for i, s in enumerate(settings) if s.rank == rank and s.keep >= 1]
            keeps = sorted({s.keep for _, s in mine})
            selected = {keep: torch.zeros_like(scores, dtype=torch.bool) for keep in keeps}
            for start, stop, indices, counts in self.ranked(state, query, mask, rank, keeps):
                slots = torch.arange(indices.shape[-1], device=query.device)
                for keep in keeps:
                    valid = (slots < counts[keep][..., None]).expand_as(indices)
                    chunk = torch.zeros_like(selected[keep][:, :, start:stop])
                    selected[keep][:, :, start:stop] = chunk.scatter_(-1, indices, valid)
            for index, setting in mine:
                outputs[index] = self._masked_output(scores, values, selected[setting.keep])
        for index, setting in enumerate(settings):
            if setting.is_exact(self.head_dim):
                outputs[index] = super().reference(state, query, key, value, mask, scaling, setting)
        return [outputs[i] for i in range(len(settings))]

    def attend(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """Gather path: each query chunk attends its gathered keys only."""
        if setting.is_exact(self.head_dim):
            return super().attend(state, query, key, value, mask, scaling, setting)
        groups = query.shape[1] // key.shape[1]
        keys, values = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, N, d)
        batch, heads, n_keys, dim = keys.shape
        rows_keys = keys.reshape(batch * heads * n_keys, dim)  # one row per (head, key)
        rows_values = values.reshape(batch * heads * n_keys, dim)
        offsets = torch.arange(batch * heads, device=query.device).reshape(batch, heads, 1, 1)
        output = torch.empty_like(query)  # (B, H, T, d)
        for start, stop, indices, valid in self.select(state, query, mask, setting):
            chunk, k_max = stop - start, indices.shape[-1]
            rows = (indices + offsets * n_keys).reshape(-1)  # (B * H * Tc * k,)
            shape = (batch, heads, chunk, k_max, dim)
            chosen_keys = rows_keys.index_select(0, rows).reshape(shape)  # (B, H, Tc, k, d)
            chosen_values = rows_values.index_select(0, rows).reshape(shape)
            scores = torch.einsum("bhtd,bhtkd->bhtk", query[:, :, start:stop], chosen_keys)
            scores = (scores * scaling).masked_fill(~valid, float("-inf"))
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
            output[:, :, start:stop] = torch.einsum("bhtk,bhtkd->bhtd", weights, chosen_values)
        return output

    # -- FLOPs -----------------------------------------------------------------------------

    def gathered_keys(self, shape: CallShape, keep: float) -> int:
        """Sum over query chunks of ``chunk size x the chunk's largest k_i`` (causal shape)."""
        window = shape.keys if self.keep_of == "window" else None
        kept = kept_keys(shape.causal_keys(), keep, self.min_keys, window)  # (T,)
        n_chunks = ceil_div(shape.queries, self.query_chunk)
        return int(
            sum(
                len(part) * int(part.max())
                for part in np.array_split(kept, np.arange(1, n_chunks) * self.query_chunk)
            )
        )

    def kept_total(self, shape: CallShape, setting: Setting) -> int:
        """Keys attended exactly (:func:`kept_keys` per query, no chunk padding), all heads."""
        setting = self.check_setting(setting)
        if setting.is_exact(self.head_dim):
            return super().kept_total(shape, setting)
        window = shape.keys if self.keep_of == "window" else None
        kept = kept_keys(shape.causal_keys(), setting.keep, self.min_keys, window)  # (T,)
        return shape.heads * shape.batch * int(kept.sum())

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        d, t, n, r, h = shape.head_dim, shape.queries, shape.keys, setting.rank, shape.heads
        gathered = self.gathered_keys(shape, setting.keep)
        return FlopsBreakdown(
            projections=h * 2 * t * d * r,
            scores=h * (2 * t * n * r + 2 * gathered * d),
            selection=h * t * n,
            softmax=h * 5 * gathered,
            output=h * 2 * gathered * d,
        ).scaled(shape.batch)

"""``topp``: rank-guided top-p sparse attention (after Twilight, arXiv 2502.02770).

Each query keeps the fewest keys that hold a mass ``p`` of its *estimated* attention, then
runs exact attention on them. The estimate is the softmax of the rank-``r`` selection
scores of ``topk`` (queries and keys in the fixed rotated basis of ``calibrated-kv``, first
``r`` coordinates), times ``scaling``, plus the mask. With ``n_i`` causal keys, query ``i``
sorts its estimated weights in decreasing order and keeps

    ``k_i = min(n_i, max(min(min_keys, n_i), #(cumsum < p) + 1))``

keys; masked keys (weight 0) are never kept. ``p = 1`` keeps every causal key (what exact
arithmetic gives; a float32 cumulative sum may reach 1 early). The additive mask is read as
allowed (0) or not (the dtype's minimum), as a causal LM passes it.

For ``topp``, a setting's ``keep`` is the mass target ``p``, not a fraction of keys.
``p = 0`` is allowed and keeps only each query's ``min_keys`` best keys (a floor whose cost
is static); ``Setting(d, p < 1)`` selects with exact scores (the upper bound of the
estimate) and is not exact; ``Setting(d, 1)`` is exact attention.

Executed FLOPs per query head, summed over heads and sequences, with ``k_i`` keys kept by
query ``i``: ``2 T d r`` (rotate queries, ``projections``) + ``2 T N r`` (selection scores,
``scores``) + ``T N (5 + ceil(log2 N) + 1)`` (``selection``: softmax of the estimate, the
ordering of each row counted as one full sort, ``N ceil(log2 N)`` comparisons, and the
cumulative sum; counted at ``p = 0`` too. The CPU kernel orders rows with a partial top-k
first and sorts a chunk whole only when the mass is not reached, so it may run fewer or
more comparisons than this count; the kept keys are those of a full sort) + ``sum_i
2 k_i d`` (exact scores on the kept keys, ``scores``) + ``sum_i 5 k_i`` (``softmax``) +
``sum_i 2 k_i d`` (``output``), plus the rotation of each new key once (``features``).
Only kept keys count (the sparse kernel's count, no padding).

The cost depends on the data, so :attr:`TopPMethod.static_cost` is False: :meth:`flops`
and :meth:`kept_total` give the upper bound (every causal key kept; at ``p = 0`` the exact
count, ``min(n_i, min_keys)`` keys per query), which is what static cost tables and the
budget wall use; :meth:`executed_flops` and :meth:`executed_kept` give the realised counts
of the last :meth:`attend` (:meth:`flops_for_kept` for a given kept total).

On CPU the model runs the sparse setting as a dense masked kernel per query chunk
(:meth:`TopPMethod.attend`: exact scores of the chunk, every key not kept masked out),
which was faster there than gathering the kept keys (:meth:`TopPMethod.attend_gather`);
the FLOPs counted are those of the sparse kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods.base import CallShape, Setting, repeat_kv
from drrl_env.methods.topk import SelectingMethod, allowed_keys

MASS_TARGETS = (0.0, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
"""Default mass targets of an environment's grid: the floor (0) and the useful range."""
FIRST_CANDIDATES = 256
"""Keys per query the selection first ranks (doubled until the mass target is reached)."""
SELECTION_FLOPS_PER_SCORE = 5 + 1
"""Per estimated score: its softmax (5) and the cumulative sum (1); the sort comes on top."""


def sort_comparisons(keys: int) -> int:
    """Comparisons per key of sorting a row of ``keys``: ``ceil(log2 keys)``."""
    return (keys - 1).bit_length()


def mass_counts(
    mass: torch.Tensor, masses: Sequence[float], n_i: torch.Tensor, low: torch.Tensor
) -> dict[float, torch.Tensor]:
    """Keys kept per query at each mass target: ``{p: (B, H, Tc)}``.

    ``mass`` (B, H, Tc, k) is each row's cumulative estimated weight in decreasing order;
    ``n_i`` and ``low`` (B, 1, Tc) are the causal keys and the floor ``min(n_i, min_keys)``.
    ``#(mass < p)`` is found by binary search, as the cumulative sum of non-negative weights
    never decreases (on CPU a float32 cumsum accumulates sequentially in float64, so the
    running maximum taken here changes nothing; it only guarantees the order elsewhere).
    """
    mass = mass.cummax(dim=-1).values
    targets = torch.tensor(masses, dtype=mass.dtype, device=mass.device)
    below = torch.searchsorted(mass, targets.expand(*mass.shape[:-1], len(masses)).contiguous())
    return {
        p: torch.minimum(n_i, torch.maximum(low, below[..., j] + 1))
        if p < 1
        else n_i.expand_as(mass[..., 0])
        for j, p in enumerate(masses)
    }


def key_positions(order: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Each key's place in its row of ``order`` (B, H, Tc, k): (B, H, Tc, n_keys) int64, and
    ``n_keys`` for a key the row does not list, so ``position < count`` keeps a row's first
    ``count`` keys (one scatter for every mass target)."""
    slots = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    position = torch.full((*order.shape[:-1], n_keys), n_keys, device=order.device)
    return position.scatter_(-1, order, slots)


class TopPMethod(SelectingMethod):
    """Rank-r estimated attention picks each query's keys holding mass p; exact attention on them.

    Args: as for :class:`~drrl_env.methods.topk.SelectingMethod`.
    """

    name = "topp"
    description = "rank-r estimated attention keeps the fewest keys of mass p; exact on them"
    keep_allows_zero = True
    static_cost = False
    selects_at_full_rank = True
    """Environment grids offer (d, p) too: exact scores select (the upper bound)."""
    default_keeps = MASS_TARGETS
    """Mass targets of an environment's grid unless ``keeps=`` says otherwise."""

    # -- selection (one function for every path, so they keep the same keys) -----------------

    def ranked(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        rank: int,
        masses: Sequence[float],
    ) -> Iterator[tuple[int, int, torch.Tensor, dict[float, torch.Tensor]]]:
        """Per query chunk: (start, stop, order (B, H, Tc, k), {p: counts (B, H, Tc)}).

        ``order`` lists each query's ``k`` keys of largest estimated weight at ``rank``, in
        decreasing order; a query keeping ``k_i`` keys at mass ``p`` attends the first
        ``counts[p]`` of its row (``counts <= k``). A partial selection of ``k`` keys
        (several times faster than sorting every row on a CPU) is tried first, ``k`` the
        power of two from what the previous chunk needed (:data:`FIRST_CANDIDATES` for
        the first, ``min_keys`` at ``p = 0``); if some query does not reach the largest ``p`` within
        its first ``k`` keys while it has more, the chunk is sorted whole. Either way the
        kept keys are exactly those a full sort keeps. Any ``p >= 1`` keeps every causal
        key and sorts the whole row.
        """
        query_proj, key_proj = self.rotated(state, query, rank)  # (B,H,T,r), (B,H,N,r)
        batch, _, queries, _ = query.shape
        n_keys = key_proj.shape[2]
        allowed = allowed_keys(mask, batch, queries, n_keys).to(query.device)  # (B, 1, T)
        floor = allowed.clamp_max(self.min_keys)  # (B, 1, T)
        top = max(masses)
        guess = self.min_keys if top <= 0 else FIRST_CANDIDATES
        for start in range(0, queries, self.query_chunk):
            stop = min(start + self.query_chunk, queries)
            scores = torch.matmul(query_proj[:, :, start:stop], key_proj.transpose(2, 3))
            logits = (scores * scaling).float()  # (B, H, Tc, N)
            if mask is not None:
                chunk_mask = mask[:, :, start:stop]  # (B, 1, Tc, N)
                blocked = chunk_mask <= torch.finfo(mask.dtype).min / 2
                logits = (logits + chunk_mask).masked_fill(blocked, float("-inf"))
            n_i, low = allowed[..., start:stop], floor[..., start:stop]  # (B, 1, Tc)
            total = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, H, Tc, 1)
            k = n_keys if top >= 1 else min(n_keys, max(guess, self.min_keys))
            while True:
                ordered, order = logits.topk(k, dim=-1)  # (B, H, Tc, k), decreasing
                mass = torch.exp(ordered - total).cumsum(dim=-1)  # (B, H, Tc, k)
                short = (mass[..., -1] < top) & (n_i > k)  # rows needing more candidates
                if k == n_keys or not bool(short.any()):
                    break
                k = n_keys  # a second partial round would cost more than one full sort
            counts = mass_counts(mass, masses, n_i, low)  # p -> (B, H, Tc)
            needed = int(max(c.max() for c in counts.values()))
            guess = 1 << max(needed - 1, 0).bit_length()  # the next chunk's first k
            yield start, stop, order, counts

    def selected(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        rank: int,
        masses: Sequence[float],
    ) -> tuple[dict[float, torch.Tensor], dict[float, int]]:
        """The kept keys as dense masks ({p: (B, H, T, N) bool}) and their totals ({p: int})."""
        batch, heads, queries, _ = query.shape
        n_keys = state["rotated_keys"].shape[2]
        shape = (batch, heads, queries, n_keys)
        kept = {p: torch.empty(shape, dtype=torch.bool, device=query.device) for p in masses}
        totals = {p: torch.zeros((), dtype=torch.long, device=query.device) for p in masses}
        for start, stop, order, counts in self.ranked(state, query, mask, scaling, rank, masses):
            position = key_positions(order, n_keys)  # (B, H, Tc, N)
            for p, count in counts.items():
                torch.lt(position, count[..., None], out=kept[p][:, :, start:stop])
                totals[p] += count.sum()
        return kept, {p: int(total) for p, total in totals.items()}

    # -- kernels -----------------------------------------------------------------------------

    @staticmethod
    def _masked_output(
        scores: torch.Tensor, values: torch.Tensor, kept: torch.Tensor
    ) -> torch.Tensor:
        """softmax over the kept keys of ``scores`` (B, H, T, N), times ``values`` (B, H, N, d)."""
        weights = F.softmax(scores.masked_fill(~kept, float("-inf")), dim=-1, dtype=torch.float32)
        return torch.matmul(weights.to(values.dtype), values)  # (B, H, T, d)

    def _record(self, state: dict[str, Any], setting: Setting, kept: int) -> None:
        """Remember the kept total of the last call (and its setting) in ``state``."""
        state["kept"], state["kept_setting"] = kept, setting

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
        """Dense eager reference: exact scores (B, H, T, N), every key not kept masked out."""
        if setting.is_exact(self.head_dim):
            output = super().reference(state, query, key, value, mask, scaling, setting)
        else:
            output = self.sweep_outputs(state, query, key, value, mask, scaling, [setting])[0]
        self._record(state, setting, self._kept_of_sweep(state, query, key, setting))
        return output

    def _kept_of_sweep(
        self, state: dict[str, Any], query: torch.Tensor, key: torch.Tensor, setting: Setting
    ) -> int:
        """Kept total of a reference call (the sweep of its one setting, or every key)."""
        if setting.is_exact(self.head_dim):
            return self.kept_total(CallShape.of(query, key), setting)
        return state["sweep_kept"][0]

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
        """Outputs of ``settings``: exact scores once, one sort per rank, one mask per p.

        Stores ``state["sweep_kept"]``: the kept total of each setting (every causal key
        for an exact one).
        """
        groups = query.shape[1] // key.shape[1]
        values = repeat_kv(value, groups)  # (B, H, N, d)
        all_keys = self.kept_total(CallShape.of(query, key), Setting(self.head_dim))
        outputs: dict[int, torch.Tensor] = {}
        kept_of: dict[int, int] = {}
        sparse = [(i, s) for i, s in enumerate(settings) if not s.is_exact(self.head_dim)]
        if sparse:
            scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling
            for rank in sorted({s.rank for _, s in sparse}):
                mine = [(i, s) for i, s in sparse if s.rank == rank]
                masses = sorted({s.keep for _, s in mine})
                kept, totals = self.selected(state, query, mask, scaling, rank, masses)
                for index, setting in mine:
                    outputs[index] = self._masked_output(scores, values, kept[setting.keep])
                    kept_of[index] = totals[setting.keep]
        for index, setting in enumerate(settings):
            if setting.is_exact(self.head_dim):
                outputs[index] = super().reference(state, query, key, value, mask, scaling, setting)
                kept_of[index] = all_keys
        state["sweep_kept"] = [kept_of[i] for i in range(len(settings))]
        state["sweep_settings"] = list(settings)
        return [outputs[i] for i in range(len(settings))]

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
        """Dense masked kernel per query chunk: exact scores, keys not kept masked out."""
        if setting.is_exact(self.head_dim):
            self._record(state, setting, self.kept_total(CallShape.of(query, key), setting))
            return super().attend(state, query, key, value, mask, scaling, setting)
        groups = query.shape[1] // key.shape[1]
        keys, values = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, N, d)
        output = torch.empty_like(query)  # (B, H, T, d)
        total = torch.zeros((), dtype=torch.long, device=query.device)
        p = setting.keep
        for start, stop, order, counts in self.ranked(
            state, query, mask, scaling, setting.rank, [p]
        ):
            kept = key_positions(order, keys.shape[2]) < counts[p][..., None]  # (B, H, Tc, N)
            scores = torch.matmul(query[:, :, start:stop], keys.transpose(2, 3)) * scaling
            output[:, :, start:stop] = self._masked_output(scores, values, kept)
            total += counts[p].sum()
        self._record(state, setting, int(total))
        return output

    def attend_gather(
        self,
        state: dict[str, Any],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        setting: Setting,
    ) -> torch.Tensor:
        """Gather path: each query chunk gathers its largest ``k_i`` keys, padding masked."""
        if setting.is_exact(self.head_dim):
            return self.attend(state, query, key, value, mask, scaling, setting)
        groups = query.shape[1] // key.shape[1]
        keys, values = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, N, d)
        batch, heads, n_keys, dim = keys.shape
        rows_keys = keys.reshape(batch * heads * n_keys, dim)  # one row per (head, key)
        rows_values = values.reshape(batch * heads * n_keys, dim)
        offsets = torch.arange(batch * heads, device=query.device).reshape(batch, heads, 1, 1)
        output = torch.empty_like(query)  # (B, H, T, d)
        total = torch.zeros((), dtype=torch.long, device=query.device)
        p = setting.keep
        for start, stop, order, counts in self.ranked(
            state, query, mask, scaling, setting.rank, [p]
        ):
            count = counts[p]  # (B, H, Tc)
            k_max = int(count.max())
            valid = torch.arange(k_max, device=query.device) < count[..., None]  # (B,H,Tc,k)
            rows = (order[..., :k_max] + offsets * n_keys).reshape(-1)  # (B * H * Tc * k,)
            shape = (batch, heads, stop - start, k_max, dim)
            chosen_keys = rows_keys.index_select(0, rows).reshape(shape)  # (B, H, Tc, k, d)
            chosen_values = rows_values.index_select(0, rows).reshape(shape)
            scores = torch.einsum("bhtd,bhtkd->bhtk", query[:, :, start:stop], chosen_keys)
            scores = (scores * scaling).masked_fill(~valid, float("-inf"))
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
            output[:, :, start:stop] = torch.einsum("bhtk,bhtkd->bhtd", weights, chosen_values)
            total += count.sum()
        self._record(state, setting, int(total))
        return output

    # -- FLOPs and kept keys -------------------------------------------------------------------

    def kept_total(self, shape: CallShape, setting: Setting) -> int:
        """Upper bound of the kept total: every causal key (``min(n_i, min_keys)`` at p = 0)."""
        setting = self.check_setting(setting)
        causal = shape.causal_keys()  # (T,)
        if setting.keep == 0:
            causal = causal.clip(max=self.min_keys)
        return shape.heads * shape.batch * int(causal.sum())

    def _selection_flops(self, shape: CallShape, rank: int) -> FlopsBreakdown:
        """Rotating the queries, the selection scores, their softmax, sort and cumsum."""
        d, t, n, h = shape.head_dim, shape.queries, shape.keys, shape.heads
        return FlopsBreakdown(
            projections=h * 2 * t * d * rank,
            scores=h * 2 * t * n * rank,
            selection=h * t * n * (SELECTION_FLOPS_PER_SCORE + sort_comparisons(n)),
        ).scaled(shape.batch)

    def _kept_flops(self, shape: CallShape, kept: int) -> FlopsBreakdown:
        """Exact attention on ``kept`` keys (summed over sequences, heads and queries)."""
        d = shape.head_dim
        return FlopsBreakdown(scores=2 * kept * d, softmax=5 * kept, output=2 * kept * d)

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        """Upper bound (every causal key kept; the exact count at p = 0)."""
        kept = self.kept_total(shape, setting)
        return self._selection_flops(shape, setting.rank) + self._kept_flops(shape, kept)

    def flops_for_kept(self, shape: CallShape, setting: Setting, kept_total: int) -> FlopsBreakdown:
        """Realised FLOPs of a call that kept ``kept_total`` keys (features included).

        ``kept_total`` is summed over sequences, query heads and queries, as
        :meth:`executed_kept`. At an exact setting, :meth:`flops` (``kept_total`` unused).
        """
        setting = self.check_setting(setting)
        if setting.is_exact(self.head_dim):
            return self.flops(shape, setting)
        run = self._selection_flops(shape, setting.rank) + self._kept_flops(shape, kept_total)
        return self.feature_flops(shape) + run

    def executed_kept(self, state: dict[str, Any], shape: CallShape, setting: Setting) -> int:
        """Kept total of the last :meth:`attend` (or :meth:`reference`) with ``state``.

        Raises:
            ValueError: No call at ``setting`` was made with ``state``.
        """
        setting = self.check_setting(setting)
        if setting.is_exact(self.head_dim):
            return self.kept_total(shape, setting)
        if state.get("kept_setting") != setting:
            raise ValueError(f"no attend call at {setting} was made with this state")
        return int(state["kept"])

    def executed_flops(
        self, state: dict[str, Any], shape: CallShape, setting: Setting
    ) -> FlopsBreakdown:
        """Realised FLOPs of the last :meth:`attend` (or :meth:`reference`) with ``state``."""
        return self.flops_for_kept(shape, setting, self.executed_kept(state, shape, setting))

    def sweep_costs(
        self, state: dict[str, Any], shape: CallShape, settings: list[Setting]
    ) -> list[tuple[FlopsBreakdown, int]]:
        """Realised (FLOPs, kept total) of each setting of the last :meth:`sweep_outputs`.

        Raises:
            ValueError: The last sweep with ``state`` was not over ``settings``.
        """
        if state.get("sweep_settings") != list(settings):
            raise ValueError("the last sweep_outputs call with this state had other settings")
        return [
            (self.flops_for_kept(shape, s, kept), kept)
            for s, kept in zip(settings, state["sweep_kept"], strict=True)
        ]

"""Segment-wise runner: a window through a frozen LM, segment by segment, a rank per layer.

``run_window`` feeds the window in segments of ``segment_length`` tokens over the KV
cache. Before every attention layer of every segment, the rank comes from a schedule
(one int, an array ``(segments, layers)``, or a function of the segment and the
:class:`~drrl_env.lm.attention.LayerRequest`). It returns what each (segment, layer) did
and the window's negative log-likelihood, so perplexity under any schedule is one call.

``LiveWindow`` runs the same loop closed-loop, one decision at a time, for environments:
the model's forward pass is suspended (a greenlet) at each layer until the rank is sent.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from greenlet import GreenletExit, greenlet

from drrl_env.lm.attention import LayerRecord, LayerRequest, RankController, check_rank
from drrl_env.lm.models import LoadedModel

Schedule = int | np.ndarray | Sequence[Sequence[int]] | Callable[[int, LayerRequest], int] | None


@dataclass
class WindowResult:
    """Per-(segment, layer) measurements of one window and its log-likelihood."""

    method: str
    segment_length: int
    ranks: np.ndarray  # (S, L) int
    fidelity: np.ndarray  # (S, L) cosine of executed vs full-rank attention output
    flops: np.ndarray  # (S, L) executed attention FLOPs, basis search included
    flops_full: np.ndarray  # (S, L) FLOPs of full-rank attention on the same shapes
    spectra: np.ndarray  # (S, L, d) normalised spectrum of Q^T Q + K^T K
    input_stats: np.ndarray  # (S, L, 3) statistics of each layer's input
    nll_sum: float
    n_predicted: int
    sweep_fidelity: np.ndarray | None = None  # (S, L, K) teacher-forced fidelity per rank

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood) of the window's predicted tokens."""
        return math.exp(self.nll_sum / self.n_predicted)

    @property
    def flops_ratio(self) -> float:
        """Executed over full-rank attention FLOPs, over the whole window."""
        return float(self.flops.sum() / self.flops_full.sum())

    @property
    def mean_fidelity(self) -> float:
        return float(self.fidelity.mean())


def segment_bounds(n_tokens: int, segment_length: int) -> list[tuple[int, int]]:
    """(start, stop) of each segment of a window of ``n_tokens``."""
    return [(s, min(s + segment_length, n_tokens)) for s in range(0, n_tokens, segment_length)]


def _as_token_tensor(tokens, lm: LoadedModel) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"tokens must hold at least 2 tokens, got {ids.numel()}")
    if ids.numel() > lm.max_positions:
        raise ValueError(
            f"tokens has {ids.numel()} tokens, more than the context of {lm.name} "
            f"({lm.max_positions})"
        )
    return ids.to(lm.device)


def _schedule_function(schedule: Schedule, n_segments: int, n_layers: int):
    """Normalise a schedule to ``f(segment, request) -> rank`` (None: full rank)."""
    if schedule is None or callable(schedule):
        return schedule
    try:
        table = np.asarray(schedule)
    except ValueError:  # ragged nested sequences
        raise ValueError(
            f"schedule has shape (ragged), expected (segments, layers) = ({n_segments}, {n_layers})"
        ) from None
    if table.ndim == 0:
        return lambda segment, request: schedule  # checked as a rank by the controller
    if table.shape != (n_segments, n_layers):
        raise ValueError(
            f"schedule has shape {table.shape}, expected (segments, layers) = "
            f"({n_segments}, {n_layers})"
        )
    # .item(): a float entry such as 2.5 reaches the rank check instead of being truncated.
    return lambda segment, request: table[segment, request.layer].item()


def check_basis_shape(basis: torch.Tensor, lm: LoadedModel) -> None:
    """ValueError unless ``basis`` has the shape (layers, heads, d, d) of ``lm``."""
    expected = (lm.n_layers, lm.n_heads, lm.head_dim, lm.head_dim)
    if tuple(basis.shape) != expected:
        raise ValueError(
            f"basis has shape {tuple(basis.shape)}, but {lm.name} needs (layers, heads, d, d) "
            f"= {expected}: a basis calibrated for another model?"
        )


def _check_segment_length(segment_length: int) -> int:
    """``segment_length`` as int, or ValueError unless it is a positive integer."""
    if (
        isinstance(segment_length, bool)
        or not isinstance(segment_length, int | np.integer)
        or segment_length < 1
    ):
        raise ValueError(f"segment_length must be a positive int, got {segment_length!r}")
    return int(segment_length)


def forward_with_cache(model: torch.nn.Module, input_ids: torch.Tensor, cache):
    """One forward pass over ``input_ids`` (B, T) continuing the KV ``cache`` (None to start).

    transformers renamed the cache argument and output field ``past_key_values`` to
    ``cache`` (the old name is deprecated); this uses whichever name the installed
    version's ``forward`` takes.

    Returns:
        The model output and the updated cache.
    """
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **{name: cache})
    return out, getattr(out, name)


def forward_segments(
    lm: LoadedModel,
    tokens,
    segment_length: int,
    controller: RankController,
    on_segment: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Feed a window segment by segment over the KV cache with ``controller`` attached.

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        tokens: 1-D token ids of the window (at most the model's context).
        segment_length: Tokens per segment (the last segment may be shorter).
        controller: Attached for the window and detached afterwards, even on error.
        on_segment: Called with the segment index before each segment runs.

    Returns:
        The summed negative log-likelihood of the predicted tokens and their number.
    """
    ids = _as_token_tensor(tokens, lm)
    bounds = segment_bounds(ids.numel(), _check_segment_length(segment_length))
    controller.attach(lm.model)
    nll_sum, cache = 0.0, None
    try:
        for segment, (start, stop) in enumerate(bounds):
            if on_segment is not None:
                on_segment(segment)
            out, cache = forward_with_cache(lm.model, ids[None, start:stop], cache)
            targets = ids[start + 1 : stop + 1]
            logits = out.logits[0, : targets.numel()].float()
            nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
    finally:
        controller.detach(lm.model)
    return nll_sum, ids.numel() - 1


def run_window(
    lm: LoadedModel,
    tokens,
    segment_length: int,
    method: str = "gram",
    schedule: Schedule = None,
    sweep_ranks: Sequence[int] | None = None,
    basis: torch.Tensor | None = None,
    on_record: Callable[[LayerRecord], None] | None = None,
) -> WindowResult:
    """Run one window segment by segment with a rank per (segment, layer).

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        tokens: 1-D token ids of the window (at most the model's context).
        segment_length: Tokens per segment (the last segment may be shorter).
        method: ``full``, ``svd``, ``gram`` or ``calibrated``.
        schedule: Rank source: None (full rank), one int, an (S, L) array, or a function
            ``f(segment, request) -> rank``.
        sweep_ranks: Also measure the teacher-forced fidelity of these ranks at every step.
        basis: Calibrated bases (L, H, d, d) for ``method="calibrated"``.
        on_record: Called with each layer's record as soon as it exists.

    Returns:
        A :class:`WindowResult`.
    """
    ids = _as_token_tensor(tokens, lm)
    segment_length = _check_segment_length(segment_length)
    bounds = segment_bounds(ids.numel(), segment_length)
    choose = _schedule_function(schedule, len(bounds), lm.n_layers)
    if method == "calibrated" and basis is not None:
        check_basis_shape(basis, lm)
    current = [0]  # the segment being run, read by decide

    def decide(request: LayerRequest) -> int:
        return choose(current[0], request)

    def on_segment(segment: int) -> None:
        current[0] = segment

    controller = RankController(
        lm.n_layers,
        lm.head_dim,
        method=method,
        decide=decide if choose else None,
        sweep_ranks=sweep_ranks,
        basis=basis,
        on_record=on_record,
    )
    nll_sum, n_predicted = forward_segments(lm, ids, segment_length, controller, on_segment)
    return _collect(
        controller.records,
        method,
        segment_length,
        len(bounds),
        lm.n_layers,
        nll_sum,
        n_predicted,
    )


def _collect(
    records: list[LayerRecord], method, segment_length, n_segments, n_layers, nll_sum, n_predicted
) -> WindowResult:
    if len(records) != n_segments * n_layers:
        raise RuntimeError(f"expected {n_segments * n_layers} layer calls, saw {len(records)}")

    def grid(values) -> np.ndarray:
        array = np.asarray(values)
        return array.reshape(n_segments, n_layers, *array.shape[1:])

    sweep = records[0].sweep_fidelity is not None
    return WindowResult(
        method=method,
        segment_length=segment_length,
        ranks=grid([r.rank for r in records]).astype(np.int64),
        fidelity=grid([r.fidelity for r in records]),
        flops=grid([float(r.flops.total) for r in records]),
        flops_full=grid([float(r.flops_full.total) for r in records]),
        spectra=grid([r.spectrum for r in records]),
        input_stats=grid([r.input_stats for r in records]),
        nll_sum=nll_sum,
        n_predicted=n_predicted,
        sweep_fidelity=grid([r.sweep_fidelity for r in records]) if sweep else None,
    )


class LiveWindow:
    """Closed-loop run of one window, one rank decision at a time.

    Example:
        >>> live = LiveWindow(lm, tokens, segment_length=256, method="gram")
        >>> request = live.start()
        >>> while request is not None:
        ...     record, request = live.step(rank_for(request))
        >>> live.result.perplexity
    """

    def __init__(
        self,
        lm: LoadedModel,
        tokens,
        segment_length: int,
        method: str = "gram",
        basis: torch.Tensor | None = None,
    ) -> None:
        self._args = (lm, tokens, segment_length, method)
        self._basis = basis
        self._records: list[LayerRecord] = []
        self._worker: greenlet | None = None
        self.segment = 0
        self.result: WindowResult | None = None

    def _decide(self, segment: int, request: LayerRequest) -> int:
        self.segment = segment
        return self._worker.parent.switch(request)

    def _run(self) -> WindowResult:
        lm, tokens, segment_length, method = self._args
        return run_window(
            lm,
            tokens,
            segment_length,
            method,
            self._decide,
            basis=self._basis,
            on_record=self._records.append,
        )

    def _advance(self, *value) -> LayerRequest | None:
        answer = self._worker.switch(*value)
        if isinstance(answer, WindowResult):
            self.result = answer
            return None
        return answer

    def start(self) -> LayerRequest:
        """Run up to the first decision and return its request."""
        self.close()
        self._records.clear()
        self._worker = greenlet(self._run)
        return self._advance()

    def step(self, rank: int) -> tuple[LayerRecord, LayerRequest | None]:
        """Execute the pending layer at ``rank``; return its record and the next request."""
        if self._worker is None or self._worker.dead:
            raise RuntimeError("LiveWindow.step called before start() or after the window ended")
        rank = check_rank(rank, self._args[0].head_dim)  # a bad rank leaves the window running
        request = self._advance(rank)
        return self._records[-1], request

    def close(self) -> None:
        """Abandon a window still running (its controller is detached)."""
        if self._worker is not None and not self._worker.dead:
            self._worker.throw(GreenletExit)
        self._worker = None

"""Segment-wise runner: a window through a frozen LM, segment by segment, a setting per layer.

``run_window`` feeds the window in segments of ``segment_length`` tokens over the KV
cache. Before every attention layer of every segment, the setting (a rank, or a
:class:`~drrl_env.methods.base.Setting` of rank and keep fraction) comes from a schedule
(one value, an array ``(segments, layers)``, or a function of the segment and the
:class:`~drrl_env.lm.controller.LayerRequest`). It returns what each (segment, layer) did
and the window's negative log-likelihood, so perplexity under any schedule is one call.

``LiveWindow`` runs the same loop closed-loop, one decision at a time, for environments:
the model's forward pass is suspended (a greenlet) at each layer until the setting is sent.
Each window runs in its greenlet's own context, so several live windows can share a model.
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

from drrl_env.lm.attention import install_input_hooks
from drrl_env.lm.controller import AttentionController, LayerRecord, LayerRequest, to_setting
from drrl_env.lm.measure import LossGradient, SweepProbe, TermProbe, token_ids
from drrl_env.lm.models import LoadedModel
from drrl_env.methods import make_method, method_class
from drrl_env.methods.base import AttentionMethod, Setting

Schedule = (
    int
    | Setting
    | np.ndarray
    | Sequence[Sequence[int]]
    | Callable[[int, LayerRequest], "int | Setting"]
    | None
)


@dataclass
class WindowResult:
    """Per-(segment, layer) measurements of one window and its log-likelihood."""

    method: str
    segment_length: int
    ranks: np.ndarray  # (S, L) int
    keeps: np.ndarray  # (S, L) keep fractions (1: every key)
    terms: dict[str, np.ndarray]  # term -> (S, L), e.g. "cosine" of executed vs exact output
    flops: np.ndarray  # (S, L) executed attention FLOPs, features and basis search included
    flops_full: np.ndarray  # (S, L) FLOPs of exact attention on the same shapes
    spectra: np.ndarray  # (S, L, d) energies the observation shows, in truncation order
    input_stats: np.ndarray  # (S, L, 3) statistics of each layer's input
    nll_sum: float
    n_predicted: int
    sweep: dict[str, np.ndarray] | None = None  # term -> (S, L, A) teacher-forced, per setting
    kept: np.ndarray | None = None  # (S, L) keys attended exactly / causal keys (realised)
    comparison: TokenComparison | None = None  # against exact attention's next-token log-probs
    logprobs: torch.Tensor | None = None  # (n_predicted, V) float32, when asked to keep them
    generated: list[int] | None = None  # greedy continuation ids, when asked to generate

    @property
    def mean_kl(self) -> float | None:
        """Mean over predicted tokens of KL(exact || this run), nats; None if not compared."""
        return None if self.comparison is None else self.comparison.mean_kl

    @property
    def top1_agreement(self) -> float | None:
        """Fraction of predicted tokens whose argmax equals exact attention's."""
        return None if self.comparison is None else self.comparison.top1_agreement

    @property
    def fidelity(self) -> np.ndarray:
        """(S, L) cosine of the executed vs exact attention output."""
        return self.terms["cosine"]

    @property
    def sweep_fidelity(self) -> np.ndarray | None:
        """(S, L, A) teacher-forced cosine of every swept setting, if swept."""
        return None if self.sweep is None else self.sweep.get("cosine")

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood) of the window's predicted tokens."""
        return math.exp(self.nll_sum / self.n_predicted)

    @property
    def flops_ratio(self) -> float:
        """Executed over exact attention FLOPs, over the whole window."""
        return float(self.flops.sum() / self.flops_full.sum())

    @property
    def mean_fidelity(self) -> float:
        return float(self.fidelity.mean())


@dataclass
class TokenComparison:
    """Next-token distributions of a run against those of exact attention on the same window.

    The measures of quantisation work (e.g. llama.cpp's KL-divergence mode): the mean over
    predicted tokens of ``KL(exact || approx)`` (never negative, 0 when identical) and the
    fraction of tokens whose most likely next token is the same.

    Args:
        reference: (n_predicted, V) float32 log-probs of exact attention
            (:func:`exact_logprobs`).
    """

    reference: torch.Tensor
    kl_sum: float = 0.0
    agree: int = 0
    count: int = 0

    def update(self, start: int, logits: torch.Tensor) -> None:
        """Compare the logits (T, V) of the positions ``start .. start + T - 1``."""
        reference = self.reference[start : start + logits.shape[0]].to(logits.device)
        if reference.shape != logits.shape:
            raise ValueError(
                f"reference log-probs {tuple(reference.shape)} do not match the logits "
                f"{tuple(logits.shape)} at position {start}: another window or model?"
            )
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (T, V)
        kl = (reference.exp() * (reference - logprobs)).sum(dim=-1)  # (T,)
        self.kl_sum += float(kl.clamp_min(0.0).sum())
        self.agree += int((reference.argmax(dim=-1) == logprobs.argmax(dim=-1)).sum())
        self.count += logits.shape[0]

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / max(self.count, 1)

    @property
    def top1_agreement(self) -> float:
        return self.agree / max(self.count, 1)


def segment_bounds(n_tokens: int, segment_length: int) -> list[tuple[int, int]]:
    """(start, stop) of each segment of a window of ``n_tokens``."""
    return [(s, min(s + segment_length, n_tokens)) for s in range(0, n_tokens, segment_length)]


def _as_token_tensor(tokens, lm: LoadedModel) -> torch.Tensor:
    """``tokens`` as 1-D long ids on the model's device, checked against its context."""
    ids = token_ids(tokens)
    if ids.numel() < 2:
        raise ValueError(f"tokens must hold at least 2 tokens, got {ids.numel()}")
    if ids.numel() > lm.max_positions:
        raise ValueError(
            f"tokens has {ids.numel()} tokens, more than the context of {lm.name} "
            f"({lm.max_positions})"
        )
    return ids.to(lm.device)


def _schedule_function(schedule: Schedule, n_segments: int, n_layers: int):
    """Normalise a schedule to ``f(segment, request) -> rank | Setting`` (None: exact)."""
    if schedule is None or callable(schedule):
        return schedule
    if isinstance(schedule, Setting):
        return lambda segment, request: schedule
    try:
        table = np.asarray(schedule)
    except ValueError:  # ragged nested sequences
        raise ValueError(
            f"schedule has shape (ragged), expected (segments, layers) = ({n_segments}, {n_layers})"
        ) from None
    if table.ndim == 0:
        return lambda segment, request: schedule  # checked as a rank by the controller
    if table.shape[:2] != (n_segments, n_layers) or table.ndim != 2:
        raise ValueError(
            f"schedule has shape {table.shape}, expected (segments, layers) = "
            f"({n_segments}, {n_layers})"
        )
    # .item(): a float entry such as 2.5 reaches the rank check instead of being truncated.
    if table.dtype == object:
        return lambda segment, request: table[segment, request.layer]
    return lambda segment, request: table[segment, request.layer].item()


def resolve_method(
    lm: LoadedModel,
    method: str | AttentionMethod,
    basis: torch.Tensor | None = None,
    **options,
) -> AttentionMethod:
    """``method`` as an :class:`AttentionMethod` for ``lm`` (a registered name is built).

    Raises:
        ValueError: The name is not registered, or the method needs a basis (or a basis of
            ``lm``'s shape) and ``basis`` does not provide it.
    """
    if isinstance(method, AttentionMethod):
        if method.head_dim != lm.head_dim or method.n_layers != lm.n_layers:
            raise ValueError(
                f"method {method.name!r} was built for head dim {method.head_dim} and "
                f"{method.n_layers} layers, {lm.name} has {lm.head_dim} and {lm.n_layers}"
            )
        return method
    cls = method_class(method)
    if cls.needs_basis:
        if basis is None:
            raise ValueError(
                f"method={method!r} needs basis= (see drrl_env.lm.calibration.calibrate_basis)"
            )
        options["basis"] = basis
    return make_method(method, lm.head_dim, lm.n_layers, **options)


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


@dataclass
class Continuation:
    """Greedy decoding after a window's last segment, over the window's KV cache.

    Each generated token is one more call of every layer with the controller still active
    (so the approximate attention decides the answer); ``before`` runs first, e.g. to fix
    the settings generation uses. The ids land in ``tokens`` (end-of-sequence excluded).
    """

    max_new_tokens: int
    before: Callable[[], None] | None = None
    tokens: list[int] | None = None

    def __post_init__(self) -> None:
        count = self.max_new_tokens
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {count!r}")

    def check_room(self, lm: LoadedModel, n_tokens: int) -> None:
        """Raise ValueError if the window and the generated tokens exceed the context."""
        if n_tokens + self.max_new_tokens > lm.max_positions:
            raise ValueError(
                f"{n_tokens} window tokens and {self.max_new_tokens} generated exceed the "
                f"context of {lm.name} ({lm.max_positions})"
            )

    def run(self, lm: LoadedModel, out, cache) -> list[int]:
        """Generate from the last segment's output ``out`` and ``cache``; return the ids."""
        if self.before is not None:
            self.before()
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        device = out.logits.device
        self.tokens = []
        for step in range(self.max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == eos:
                break
            self.tokens.append(token)
            if step + 1 < self.max_new_tokens:
                step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
                out, cache = forward_with_cache(lm.model, step_ids, cache)
        return self.tokens


def forward_segments(
    lm: LoadedModel,
    tokens,
    segment_length: int,
    controller: AttentionController,
    on_segment: Callable[[int], None] | None = None,
    comparison: TokenComparison | None = None,
    logprobs: list[torch.Tensor] | None = None,
    continuation: Continuation | None = None,
) -> tuple[float, int]:
    """Feed a window segment by segment over the KV cache with ``controller`` active.

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        tokens: 1-D token ids of the window (at most the model's context).
        segment_length: Tokens per segment (the last segment may be shorter).
        controller: Active for the window (in the current context only).
        on_segment: Called with the segment index before each segment runs.
        comparison: Compares each segment's next-token distributions with exact attention's.
        logprobs: Receives each segment's next-token log-probs (T, V) float32 on the CPU.
        continuation: Greedy decoding after the last segment (its ``tokens`` receive the ids).

    Returns:
        The summed negative log-likelihood of the predicted tokens and their number.

    Raises:
        ValueError: If the window and the continuation exceed the model's context.
    """
    ids = _as_token_tensor(tokens, lm)
    bounds = segment_bounds(ids.numel(), _check_segment_length(segment_length))
    if continuation is not None:
        continuation.check_room(lm, ids.numel())
    install_input_hooks(lm.model)
    nll_sum, cache = 0.0, None
    with controller.activate():
        for segment, (start, stop) in enumerate(bounds):
            if on_segment is not None:
                on_segment(segment)
            out, cache = forward_with_cache(lm.model, ids[None, start:stop], cache)
            targets = ids[start + 1 : stop + 1]
            logits = out.logits[0, : targets.numel()].float()
            nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            if comparison is not None:
                comparison.update(start, logits)
            if logprobs is not None:
                logprobs.append(F.log_softmax(logits, dim=-1).cpu())
        if continuation is not None:
            continuation.run(lm, out, cache)
    return nll_sum, ids.numel() - 1


def run_window(
    lm: LoadedModel,
    tokens,
    segment_length: int,
    method: str | AttentionMethod = "gram",
    schedule: Schedule = None,
    sweep: Sequence[int | Setting] | None = None,
    basis: torch.Tensor | None = None,
    on_record: Callable[[LayerRecord], None] | None = None,
    keep: float = 1.0,
    terms: Sequence[str] = ("cosine",),
    gradient: LossGradient | None = None,
    reference: torch.Tensor | None = None,
    keep_logprobs: bool = False,
    generate: int = 0,
) -> WindowResult:
    """Run one window segment by segment with a setting per (segment, layer).

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        tokens: 1-D token ids of the window (at most the model's context).
        segment_length: Tokens per segment (the last segment may be shorter).
        method: A registered method name (:func:`drrl_env.methods.method_names`) or an
            :class:`~drrl_env.methods.base.AttentionMethod` built for ``lm``.
        schedule: None (exact attention), one rank or setting, an (S, L) array, or a
            function ``f(segment, request) -> rank | Setting``.
        sweep: Also measure the teacher-forced terms of these settings at every step.
        basis: Calibrated bases for a method that needs them, when ``method`` is a name.
        on_record: Called with each layer's record as soon as it exists.
        keep: Keep fraction given to ranks that come as plain ints (sparse methods).
        terms: Raw terms measured for the executed and swept settings
            (:data:`drrl_env.lm.measure.TERMS`).
        gradient: The window's :func:`~drrl_env.lm.measure.loss_gradient`, for the
            loss-aware terms.
        reference: Exact attention's next-token log-probs of the window
            (:func:`exact_logprobs`): the result then holds the mean token KL and top-1
            agreement against them.
        keep_logprobs: Keep this run's next-token log-probs in the result.
        generate: Then decode this many tokens greedily (``result.generated``; fewer at
            end-of-sequence), every layer at the setting it had in the last segment (the
            schedule is not asked again; nothing is recorded or measured).

    Returns:
        A :class:`WindowResult`.

    Raises:
        ValueError: On a bad schedule, or if the window and ``generate`` tokens exceed the
            model's context.
    """
    ids = _as_token_tensor(tokens, lm)
    segment_length = _check_segment_length(segment_length)
    bounds = segment_bounds(ids.numel(), segment_length)
    choose = _schedule_function(schedule, len(bounds), lm.n_layers)
    attention = resolve_method(lm, method, basis)
    current = [0]  # the segment being run, read by decide

    def decide(request: LayerRequest):
        return choose(current[0], request)

    def on_segment(segment: int) -> None:
        current[0] = segment

    controller = AttentionController(
        attention,
        lm.n_layers,
        decide=decide if choose else None,
        keep=keep,
        on_record=on_record,
    )
    probes = [TermProbe(terms, gradient)]
    if sweep is not None:
        probes.append(SweepProbe([controller.as_setting(s) for s in sweep], terms, gradient))
    controller.probes = probes
    comparison = None if reference is None else TokenComparison(reference)
    logprobs: list[torch.Tensor] | None = [] if keep_logprobs else None

    def last_segment_settings() -> None:
        last = [record.setting for record in controller.records[-lm.n_layers :]]
        controller.decide = lambda request: last[request.layer]
        controller.record, controller.probes, controller.on_record = False, (), None

    continuation = Continuation(generate, last_segment_settings) if generate else None
    nll_sum, n_predicted = forward_segments(
        lm, ids, segment_length, controller, on_segment, comparison, logprobs, continuation
    )
    result = collect(
        controller.records,
        attention.name,
        segment_length,
        len(bounds),
        lm.n_layers,
        nll_sum,
        n_predicted,
    )
    result.comparison = comparison
    if logprobs is not None:
        result.logprobs = torch.cat(logprobs)
    if continuation is not None:
        result.generated = continuation.tokens
    return result


def exact_logprobs(
    lm: LoadedModel, tokens, segment_length: int, generate: int = 0
) -> tuple[WindowResult, torch.Tensor]:
    """The window at exact attention and its next-token log-probs (n_predicted, V) float32.

    The reference of :class:`TokenComparison`: the same segment-wise pass over the KV cache
    as every approximate run, so an exact setting compares at KL 0 and agreement 1.
    ``generate`` > 0 also decodes that many tokens greedily (``result.generated``).
    """
    result = run_window(lm, tokens, segment_length, "full", keep_logprobs=True, generate=generate)
    return result, result.logprobs


def collect(
    records: list[LayerRecord], method, segment_length, n_segments, n_layers, nll_sum, n_predicted
) -> WindowResult:
    """Assemble layer records (segment-major) into a :class:`WindowResult`."""
    if len(records) != n_segments * n_layers:
        raise RuntimeError(f"expected {n_segments * n_layers} layer calls, saw {len(records)}")

    def grid(values) -> np.ndarray:
        array = np.asarray(values)
        return array.reshape(n_segments, n_layers, *array.shape[1:])

    names = list(records[0].terms)
    sweep = None
    if records[0].sweep is not None:
        sweep = {name: grid([r.sweep[name] for r in records]) for name in records[0].sweep}
    stats = [r.input_stats if r.input_stats is not None else np.full(3, np.nan) for r in records]
    return WindowResult(
        method=method,
        segment_length=segment_length,
        ranks=grid([r.setting.rank for r in records]).astype(np.int64),
        keeps=grid([r.setting.keep for r in records]).astype(np.float64),
        terms={name: grid([r.terms[name] for r in records]) for name in names},
        flops=grid([float(r.flops.total) for r in records]),
        flops_full=grid([float(r.flops_full.total) for r in records]),
        spectra=grid([r.spectrum for r in records]),
        input_stats=grid(stats),
        nll_sum=nll_sum,
        n_predicted=n_predicted,
        sweep=sweep,
        kept=grid([r.kept for r in records]).astype(np.float64),
    )


class LiveWindow:
    """Closed-loop run of one window, one decision at a time.

    Takes :func:`run_window`'s options; with ``generate`` the greedy continuation runs after
    the last decision, every layer at its last-segment setting (``result.generated``).

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
        method: str | AttentionMethod = "gram",
        basis: torch.Tensor | None = None,
        keep: float = 1.0,
        terms: Sequence[str] = ("cosine",),
        gradient: LossGradient | None = None,
        reference: torch.Tensor | None = None,
        generate: int = 0,
    ) -> None:
        self.lm, self.tokens, self.segment_length = lm, tokens, segment_length
        self.method = resolve_method(lm, method, basis)
        self._options = {
            "keep": keep,
            "terms": terms,
            "gradient": gradient,
            "reference": reference,
            "generate": generate,
        }
        self._records: list[LayerRecord] = []
        self._worker: greenlet | None = None
        self.segment = 0
        self.result: WindowResult | None = None

    def _decide(self, segment: int, request: LayerRequest):
        self.segment = segment
        return self._worker.parent.switch(request)

    def _run(self) -> WindowResult:
        return run_window(
            self.lm,
            self.tokens,
            self.segment_length,
            self.method,
            self._decide,
            on_record=self._records.append,
            **self._options,
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

    def step(self, setting: int | Setting) -> tuple[LayerRecord, LayerRequest | None]:
        """Execute the pending layer at ``setting``; return its record and the next request."""
        if self._worker is None or self._worker.dead:
            raise RuntimeError("LiveWindow.step called before start() or after the window ended")
        # A bad setting raises here and leaves the window running.
        setting = to_setting(self.method, setting, self._options["keep"])
        request = self._advance(setting)
        return self._records[-1], request

    def close(self) -> None:
        """Abandon a window still running."""
        if self._worker is not None and not self._worker.dead:
            self._worker.throw(GreenletExit)
        self._worker = None

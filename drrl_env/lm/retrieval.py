"""Retrieval scoring: greedy answers under approximate attention, and exact-match scoring.

:func:`greedy_answer` runs a window (e.g. a ``passkey`` window, which ends with its question)
segment by segment over the KV cache exactly as :func:`drrl_env.lm.runner.run_window` does,
the method and schedule deciding every (segment, layer), then generates greedily with the
approximate attention still active. Each generated token is one more call of every layer
over the KV cache; those calls get the schedule's setting for the window's last segment,
per layer (a table's last row; a function is called with the last segment's index and the
one-query request). :func:`score_answer` checks the first integer of the generated text.
"""

from __future__ import annotations

import re

import torch

from drrl_env.lm.controller import AttentionController, LayerRequest
from drrl_env.lm.models import LoadedModel
from drrl_env.lm.runner import (
    Continuation,
    Schedule,
    _as_token_tensor,
    _check_segment_length,
    _schedule_function,
    forward_segments,
    resolve_method,
    segment_bounds,
)
from drrl_env.methods.base import AttentionMethod

MAX_NEW_TOKENS = 10
_INTEGER = re.compile(r"[0-9]+")


def greedy_tokens(
    lm: LoadedModel,
    tokens,
    segment_length: int,
    method: str | AttentionMethod = "full",
    schedule: Schedule = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    basis: torch.Tensor | None = None,
    keep: float = 1.0,
) -> list[int]:
    """The ids greedy decoding continues a window with, under ``method`` and ``schedule``.

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        tokens: 1-D token ids of the window; with the generated tokens at most the model's
            context.
        segment_length: Tokens per segment of the window (the last may be shorter).
        method: A registered method name or an :class:`AttentionMethod` built for ``lm``.
        schedule: As :func:`~drrl_env.lm.runner.run_window`: None (exact), one rank or
            setting, an (S, L) array, or ``f(segment, request)``; generated tokens get the
            last segment's setting per layer.
        max_new_tokens: Generate at most this many tokens (fewer at end-of-sequence).
        basis: Calibrated bases for a method that needs them, when ``method`` is a name.
        keep: Keep fraction given to ranks that come as plain ints (sparse methods).

    Returns:
        The generated ids, end-of-sequence excluded.

    Raises:
        ValueError: On a bad window, schedule or ``max_new_tokens``, or if the window and the
            generated tokens exceed the model's context.
    """
    continuation = Continuation(max_new_tokens)
    ids = _as_token_tensor(tokens, lm)
    bounds = segment_bounds(ids.numel(), _check_segment_length(segment_length))
    choose = _schedule_function(schedule, len(bounds), lm.n_layers)
    current = [0]  # the segment whose settings apply; the last one while generating

    def decide(request: LayerRequest):
        return choose(current[0], request)

    def on_segment(segment: int) -> None:
        current[0] = segment

    controller = AttentionController(
        resolve_method(lm, method, basis),
        lm.n_layers,
        decide=decide if choose else None,
        keep=keep,
        record=False,
    )
    with torch.no_grad():
        forward_segments(lm, ids, segment_length, controller, on_segment, continuation=continuation)
    return continuation.tokens


def greedy_answer(
    lm: LoadedModel,
    tokens,
    segment_length: int,
    method: str | AttentionMethod = "full",
    schedule: Schedule = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    basis: torch.Tensor | None = None,
    keep: float = 1.0,
) -> str:
    """The text greedy decoding continues a window with (see :func:`greedy_tokens`).

    Example:
        >>> windows = load_windows(lm.tokenizer, 1024, split="eval", corpus="passkey")
        >>> text = greedy_answer(lm, windows.tokens[0], 256, "gram", schedule=16)
        >>> score_answer(text, windows.metadata["answer"][0])
    """
    ids = greedy_tokens(lm, tokens, segment_length, method, schedule, max_new_tokens, basis, keep)
    return decode(lm.tokenizer, ids)


def decode(tokenizer, ids: list[int]) -> str:
    """``tokenizer.decode`` without special tokens (for tokenizers that have the option)."""
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # e.g. the byte tokenizer of the tiny models
        return tokenizer.decode(ids)


def first_integer(text: str) -> str | None:
    """The first run of ASCII digits in ``text``, or None."""
    match = _INTEGER.search(text)
    return None if match is None else match.group()


def score_answer(text: str, expected: str | int) -> bool:
    """Whether the first integer in ``text`` is exactly ``expected``.

    Leading text and spaces are ignored (``" 12345."`` answers ``12345``); a longer or
    shorter run of digits (``"123456"``) or no digits at all is wrong. Digits only: signs,
    separators and decimals end the integer (``"12,345"`` answers ``12``).
    """
    found = first_integer(text)
    return found is not None and found == str(expected).strip()

"""What the attention kernel dispatches to: the active call handler, and what a call sees.

The ``drrl`` attention kernel (:mod:`drrl_env.lm.attention`) asks :data:`ACTIVE` for the
handler of the running sequence. ``ACTIVE`` is a context variable, and every greenlet runs
in a context of its own, so two closed-loop windows suspended mid-forward on the same model
(two live environments in one process) never see each other's handler. A handler is any
:class:`CallHandler`: the :class:`~drrl_env.lm.controller.AttentionController` of a
sequence, or :class:`~drrl_env.lm.measure.GradientCapture` while a loss gradient is taken.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods.base import Setting


class CallHandler(Protocol):
    """Runs every attention layer call of one sequence.

    Attributes:
        input_stats: Whether the layer inputs are wanted (handed over in ``hidden``).
        hidden: Per layer, the input of the call about to run (set by a pre-hook).
    """

    input_stats: bool
    hidden: list[Any]

    def attend(self, layer, query, key, value, mask, scaling) -> torch.Tensor:
        """Attention output (B, H, T, d) of one layer call."""


ACTIVE: contextvars.ContextVar[CallHandler | None] = contextvars.ContextVar(
    "drrl_active_controller", default=None
)
"""The handler of the sequence running in the current context (greenlet), if any."""


@dataclass(frozen=True)
class LayerRequest:
    """What a decision may look at, for one layer on one segment, before it runs."""

    layer: int
    queries: int
    keys: int
    spectrum: np.ndarray  # (d,) energies in truncation order, summing to 1
    input_stats: np.ndarray | None  # (3,), see INPUT_STAT_NAMES


@dataclass
class LayerRecord:
    """What one layer call did."""

    layer: int
    setting: Setting
    queries: int
    keys: int
    flops: FlopsBreakdown
    flops_full: FlopsBreakdown
    spectrum: np.ndarray
    input_stats: np.ndarray | None
    kept: float = 1.0  # keys attended exactly / causal keys (realised; 1 for dense methods)
    terms: dict[str, float] = field(default_factory=dict)
    sweep: dict[str, np.ndarray] | None = None  # term -> (len(sweep settings),)

    @property
    def rank(self) -> int:
        return self.setting.rank

    @property
    def fidelity(self) -> float:
        """Cosine of the executed vs exact attention output (1 when exact)."""
        return self.terms.get("cosine", 1.0)

"""Kernel dispatch: which controller runs a layer call, and what a controller does with it.

The ``drrl`` attention kernel (:mod:`drrl_env.lm.attention`) asks
:data:`~drrl_env.lm.dispatch.ACTIVE` for the handler of the running sequence (defined, with
the request and record types, in :mod:`drrl_env.lm.dispatch` and re-exported here).

An :class:`AttentionController` runs one sequence through an
:class:`~drrl_env.methods.base.AttentionMethod`: per layer call it lets the method observe
the new keys (the spectrum), asks for the :class:`~drrl_env.methods.base.Setting` (a
schedule or a ``decide`` callback), runs the method's kernel and, when recording, measures
what happened through probes (:mod:`drrl_env.lm.measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from drrl_env.lm import INPUT_STAT_NAMES  # noqa: F401 (re-exported)
from drrl_env.lm.dispatch import ACTIVE, LayerRecord, LayerRequest
from drrl_env.lm.measure import Probe, StepContext
from drrl_env.methods.base import AttentionMethod, CallShape, Setting, exact_flops


def input_statistics(hidden: torch.Tensor) -> np.ndarray:
    """Bounded statistics of a layer input (B, T, D): the sequence dynamics ``h_t``.

    Returns ``[rms / (1 + rms), mean cosine of consecutive tokens, spread / (1 + spread)]``
    where ``spread`` is the coefficient of variation of the token norms.
    """
    hidden = hidden.float()
    norms = hidden.norm(dim=-1)  # (B, T)
    rms = float(norms.pow(2).mean().sqrt() / hidden.shape[-1] ** 0.5)
    consecutive = (
        float(torch.nn.functional.cosine_similarity(hidden[:, 1:], hidden[:, :-1], dim=-1).mean())
        if hidden.shape[1] > 1
        else 1.0
    )
    spread = float(norms.std(unbiased=False) / norms.mean().clamp_min(1e-12))
    return np.array([rms / (1 + rms), consecutive, spread / (1 + spread)], dtype=np.float64)


def to_setting(method: AttentionMethod, value: int | Setting, keep: float = 1.0) -> Setting:
    """A checked :class:`Setting` from a rank (given ``keep``, full rank keeps 1) or a setting.

    Raises:
        ValueError: The rank or keep fraction is invalid for ``method``.
    """
    if isinstance(value, Setting):
        return method.check_setting(value)
    if isinstance(value, np.generic):
        value = value.item()  # 2.5 must fail the rank check, not become 2
    if not method.uses_keep or value == method.head_dim:
        keep = 1.0
    return method.check_setting(Setting(value, keep))


Decide = Callable[[LayerRequest], "int | Setting"]


@dataclass
class AttentionController:
    """Runs every attention layer of one sequence through ``method``.

    Args:
        method: The attention method (one instance per model).
        n_layers: Attention layers of the model.
        settings: Fixed setting(s) when ``decide`` is None: one for every layer or one per
            layer (ints are ranks); None means exact attention.
        decide: Called with a :class:`LayerRequest` before each layer runs; returns a rank
            or a :class:`Setting`.
        keep: The keep fraction given to ranks that come as plain ints.
        probes: Measurements taken after each call (see :mod:`drrl_env.lm.measure`).
        record: Keep a :class:`LayerRecord` per call in ``records``.
        on_record: Called with each new record.
        input_stats: Compute the layer-input statistics for requests and records.
    """

    method: AttentionMethod
    n_layers: int
    settings: int | Setting | Sequence[int | Setting] | None = None
    decide: Decide | None = None
    keep: float = 1.0
    probes: Sequence[Probe] = ()
    record: bool = True
    on_record: Callable[[LayerRecord], None] | None = None
    input_stats: bool = True
    records: list[LayerRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._fixed = self._fixed_settings()
        self.reset()

    def _fixed_settings(self) -> list[Setting]:
        d = self.method.head_dim
        if self.settings is None:
            return [Setting(d)] * self.n_layers
        if isinstance(self.settings, Setting) or np.ndim(self.settings) == 0:
            return [self.as_setting(self.settings)] * self.n_layers
        if len(self.settings) != self.n_layers:
            raise ValueError(
                f"settings has {len(self.settings)} entries, the model {self.n_layers} layers"
            )
        return [self.as_setting(s) for s in self.settings]

    def as_setting(self, value: int | Setting) -> Setting:
        """A checked :class:`Setting` from a rank (with ``keep``) or a setting."""
        return to_setting(self.method, value, self.keep)

    def reset(self) -> None:
        """Start a new sequence: fresh method states, no records."""
        self.states = [self.method.new_state(layer) for layer in range(self.n_layers)]
        self.hidden: list[torch.Tensor | None] = [None] * self.n_layers
        self.records.clear()

    @contextmanager
    def activate(self) -> Iterator[AttentionController]:
        """Make this the controller of the current context for the duration of the block."""
        token = ACTIVE.set(self)
        try:
            yield self
        finally:
            ACTIVE.reset(token)

    # -- one layer call --------------------------------------------------------------------

    def attend(self, layer, query, key, value, mask, scaling) -> torch.Tensor:
        """Observe, decide, execute and measure one layer call; returns (B, H, T, d)."""
        state = self.states[layer]
        spectrum = self.method.observe(state, query, key)
        hidden, self.hidden[layer] = self.hidden[layer], None
        stats = input_statistics(hidden) if self.input_stats and hidden is not None else None
        if self.decide is not None:
            request = LayerRequest(layer, query.shape[2], key.shape[2], spectrum, stats)
            setting = self.as_setting(self.decide(request))
        else:
            setting = self._fixed[layer]
        output = self.method.attend(state, query, key, value, mask, scaling, setting)
        if self.record:
            shape = CallShape.of(query, key, new_keys=state["fresh"])
            kept = self.method.executed_kept(state, shape, setting)
            record = LayerRecord(
                layer=layer,
                setting=setting,
                queries=query.shape[2],
                keys=key.shape[2],
                flops=self.method.executed_flops(state, shape, setting),
                flops_full=exact_flops(shape),
                spectrum=spectrum,
                input_stats=stats,
                kept=kept / shape.causal_total,
            )
            if self.probes:
                context = StepContext(self.method, state, query, key, value, mask, scaling)
                for probe in self.probes:
                    probe.measure(context, setting, output, record)
            self.records.append(record)
            if self.on_record is not None:
                self.on_record(record)
        return output


def grab_layer_input(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
    """Forward pre-hook of attention modules: hand the layer input to the active controller."""
    controller = ACTIVE.get()
    if controller is not None and controller.input_stats:
        controller.hidden[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

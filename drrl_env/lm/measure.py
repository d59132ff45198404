"""Measurements of a layer call: fidelity terms, sweeps over settings, loss gradients.

A :class:`Probe` runs after the executed kernel of a layer call and writes into its
:class:`~drrl_env.lm.controller.LayerRecord`:

- :class:`TermProbe` measures the executed output against exact attention: ``cosine``
  (mean over tokens of the cosine of the heads' concatenated outputs, the DR-RL paper's
  fidelity) and, given the loss gradient of the window, the loss-aware estimates
  ``dnll_taylor`` and ``dnll_fisher`` (see :func:`loss_terms`);
- :class:`SweepProbe` measures the same terms for every setting of a grid while the layer
  keeps its executed (exact) output: teacher forcing, what the cached backend stores. It
  also records each setting's realised FLOPs (``flops``) and kept fraction of the causal
  keys (``kept``), which depend on the input for methods such as ``topp``.

:func:`loss_gradient` computes, with one forward and one backward pass at exact attention,
the gradient of the window's mean next-token loss with respect to every layer's attention
output, the ingredient of the loss-aware terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from drrl_env.lm.dispatch import ACTIVE, LayerRecord
from drrl_env.methods.base import (
    AttentionMethod,
    CallShape,
    Setting,
    exact_attention,
)
from drrl_env.rewards.terms import RAW_TERMS

TERMS = RAW_TERMS  # the raw measurements every reward term reads
"""Raw measurements a probe can take; the loss-aware ones need a :class:`LossGradient`."""


def output_cosine(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over tokens of the cosine between outputs (B, H, T, d), heads concatenated."""
    a = output.transpose(1, 2).flatten(2)  # (B, T, H*d)
    b = reference.transpose(1, 2).flatten(2)
    return float(F.cosine_similarity(a, b, dim=-1, eps=1e-12).mean())


@dataclass
class LossGradient:
    """Gradient of a window's mean next-token loss w.r.t. each layer's attention output.

    Attributes:
        grads: Per layer, (B, H, L, d) for the window's ``L`` positions.
        mean_nll: The window's mean next-token loss at exact attention.
    """

    grads: list[torch.Tensor]
    mean_nll: float

    def rows(self, layer: int, stop: int, queries: int) -> torch.Tensor:
        """The gradient of the ``queries`` positions ending at ``stop`` (B, H, T, d)."""
        return self.grads[layer][:, :, stop - queries : stop]


def loss_terms(delta: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """First- and second-order estimates of the mean-loss change caused by ``delta``.

    Args:
        delta: Approximate minus exact attention output (B, H, T, d).
        grad: Gradient of the window's mean loss w.r.t. that output (B, H, T, d).

    Returns:
        ``dnll_taylor = <grad, delta>`` (first-order Taylor estimate, nats per predicted
        token, may be negative) and ``dnll_fisher = 1/2 sum_t <grad_t, delta_t>^2`` (a
        Gauss-Newton style estimate per token, never negative).
    """
    per_token = (grad * delta).sum(dim=(1, 3))  # (B, T)
    return {
        "dnll_taylor": float(per_token.sum()),
        "dnll_fisher": 0.5 * float(per_token.pow(2).sum()),
    }


@dataclass
class StepContext:
    """One layer call, as probes see it (the exact output is computed once, on demand)."""

    method: AttentionMethod
    state: dict[str, Any]
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    _exact: torch.Tensor | None = field(default=None, repr=False)

    def exact(self) -> torch.Tensor:
        """Exact attention output (B, H, T, d)."""
        if self._exact is None:
            self._exact = exact_attention(self.query, self.key, self.value, self.mask, self.scaling)
        return self._exact

    def output_of(self, setting: Setting) -> torch.Tensor:
        """What the method outputs at ``setting`` (the state is not advanced)."""
        if setting.is_exact(self.method.head_dim):
            return self.exact()
        return self.method.attend(
            self.state, self.query, self.key, self.value, self.mask, self.scaling, setting
        )

    def terms(
        self, setting: Setting, output: torch.Tensor, names: Sequence[str], gradient
    ) -> dict[str, float]:
        """The raw terms ``names`` of ``output`` produced at ``setting``."""
        if setting.is_exact(self.method.head_dim):
            return {name: (1.0 if name == "cosine" else 0.0) for name in names}
        exact = self.exact()
        values: dict[str, float] = {}
        if "cosine" in names:
            values["cosine"] = output_cosine(output, exact)
        if any(name != "cosine" for name in names):
            grad = gradient.rows(self.state["layer"], self.key.shape[2], self.query.shape[2])
            values.update(loss_terms(output - exact, grad.to(output)))
        return {name: values[name] for name in names}


class Probe(Protocol):
    """A measurement taken after the executed kernel of a layer call."""

    def measure(
        self, context: StepContext, setting: Setting, output: torch.Tensor, record: LayerRecord
    ) -> None: ...


def check_terms(terms: Sequence[str], gradient: LossGradient | None) -> tuple[str, ...]:
    """``terms`` checked against :data:`TERMS` (loss-aware ones need ``gradient``)."""
    unknown = [name for name in terms if name not in TERMS]
    if unknown:
        raise ValueError(f"unknown terms {unknown}; terms: {', '.join(TERMS)}")
    if gradient is None and any(name != "cosine" for name in terms):
        raise ValueError("the loss-aware terms need gradient= (see loss_gradient)")
    return tuple(terms)


@dataclass
class TermProbe:
    """Measures ``terms`` of the executed output (``record.terms``)."""

    terms: Sequence[str] = ("cosine",)
    gradient: LossGradient | None = None

    def __post_init__(self) -> None:
        self.terms = check_terms(self.terms, self.gradient)

    def measure(self, context, setting, output, record) -> None:
        record.terms.update(context.terms(setting, output, self.terms, self.gradient))


@dataclass
class SweepProbe:
    """Measures ``terms`` of every setting of ``settings`` (``record.sweep[term]``, (A,))."""

    settings: Sequence[Setting]
    terms: Sequence[str] = ("cosine",)
    gradient: LossGradient | None = None

    def __post_init__(self) -> None:
        self.terms = check_terms(self.terms, self.gradient)

    def measure(self, context, setting, output, record) -> None:
        table = {name: np.empty(len(self.settings)) for name in self.terms}
        outputs = context.method.sweep_outputs(
            context.state,
            context.query,
            context.key,
            context.value,
            context.mask,
            context.scaling,
            list(self.settings),
        )
        for index, (candidate, candidate_output) in enumerate(
            zip(self.settings, outputs, strict=True)
        ):
            measured = context.terms(candidate, candidate_output, self.terms, self.gradient)
            for name, value in measured.items():
                table[name][index] = value
        shape = CallShape.of(context.query, context.key, new_keys=context.state["fresh"])
        costs = context.method.sweep_costs(context.state, shape, list(self.settings))
        table["flops"] = np.array([float(flops.total) for flops, _ in costs])
        table["kept"] = np.array([kept / shape.causal_total for _, kept in costs])
        record.sweep = table


class GradientCapture:
    """A :class:`~drrl_env.lm.dispatch.CallHandler` that runs exact attention and keeps each
    layer's output (for :func:`loss_gradient`).

    Args:
        n_layers: Attention layers.
        attention: The exact kernel, called as ``attention(query, key, value, mask, scaling)``.
    """

    input_stats = False

    def __init__(self, n_layers: int, attention: Callable = exact_attention) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * n_layers
        self.hidden: list[Any] = [None] * n_layers
        self.attention = attention

    def attend(self, layer, query, key, value, mask, scaling) -> torch.Tensor:
        output = self.attention(query, key, value, mask, scaling)  # (B, H, T, d)
        output.retain_grad()
        self.outputs[layer] = output
        return output


def token_ids(tokens) -> torch.Tensor:
    """``tokens`` (a sequence, an array or a tensor on any device) as 1-D long ids."""
    if isinstance(tokens, torch.Tensor):  # np.asarray cannot read a tensor on a GPU
        return tokens.detach().to(torch.long).flatten()
    return torch.as_tensor(np.asarray(tokens), dtype=torch.long).flatten()


def loss_gradient(lm, tokens, attention: Callable = exact_attention) -> LossGradient:
    """Gradient of the mean next-token loss of ``tokens`` w.r.t. every attention output.

    One forward pass of the whole window at exact attention (the same outputs as the
    segment-wise run at full rank) and one backward pass; the model's weights get no
    gradient. By default attention runs through torch's fused SDPA kernel, whose backward
    keeps no (H, T, N) weight matrix: memory grows linearly with the window instead of with
    its square (the eager operations of :func:`~drrl_env.methods.base.full_attention` keep
    such matrices for every layer: 9 x 4096 x 4096 float32 values, 604 MB, per matrix and
    layer for SmolLM2 at 4096 tokens). The two agree up to float rounding (a test checks it).

    Args:
        lm: A :class:`~drrl_env.lm.models.LoadedModel`.
        tokens: 1-D token ids of the window.
        attention: The exact attention kernel of the pass
            (:func:`~drrl_env.methods.base.exact_attention` or ``full_attention``).
    """
    ids = token_ids(tokens).to(lm.device)
    capture = GradientCapture(lm.n_layers, attention)
    token = ACTIVE.set(capture)
    try:
        with torch.enable_grad():
            embeds = lm.model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=embeds, use_cache=False).logits[0, :-1].float()
            loss = F.cross_entropy(logits, ids[1:])
            loss.backward()
    finally:
        ACTIVE.reset(token)
    missing = [i for i, out in enumerate(capture.outputs) if out is None or out.grad is None]
    if missing:
        raise RuntimeError(f"no gradient reached the attention output of layers {missing}")
    grads = [out.grad.detach() for out in capture.outputs]
    return LossGradient(grads, float(loss.detach()))

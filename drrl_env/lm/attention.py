"""The ``drrl`` attention kernel, registered with transformers' ``AttentionInterface``.

The kernel is a free function with the registry's signature; projections, RoPE, the KV
cache and the output projection stay in the model. It hands each layer call to the
controller active in the current context (:data:`drrl_env.lm.dispatch.ACTIVE`) and
computes plain eager attention, exactly as transformers' eager path, when none is active.
The attention methods themselves live in :mod:`drrl_env.methods`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from drrl_env.lm import INPUT_STAT_NAMES
from drrl_env.lm.controller import grab_layer_input, input_statistics
from drrl_env.lm.dispatch import ACTIVE
from drrl_env.methods.base import full_attention, repeat_kv

ATTENTION_NAME = "drrl"

__all__ = [
    "ATTENTION_NAME",
    "INPUT_STAT_NAMES",
    "attention_modules",
    "drrl_attention",
    "full_attention",
    "input_statistics",
    "install_input_hooks",
    "repeat_kv",
]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a transformers model, by layer index."""
    found = [
        module
        for module in model.modules()
        if hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention")
    ]
    return sorted(found, key=lambda module: module.layer_idx)


def install_input_hooks(model: torch.nn.Module) -> int:
    """Give each attention module the pre-hook that shows its input to the active controller.

    Idempotent; returns the number of attention modules.
    """
    modules = attention_modules(model)
    for module in modules:
        if not getattr(module, "drrl_input_hook", False):
            module.register_forward_pre_hook(grab_layer_input, with_kwargs=True)
            module.drrl_input_hook = True
    return len(modules)


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
    """``transformers.AttentionInterface`` kernel: eager attention, or the active controller's.

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
    controller = ACTIVE.get()
    if controller is None:
        output = full_attention(query, key, value, attention_mask, scaling)
    else:
        output = controller.attend(module.layer_idx, query, key, value, attention_mask, scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, drrl_attention)
# Without a mask function under the same name the padding mask would arrive as None.
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)

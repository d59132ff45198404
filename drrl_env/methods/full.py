"""``full``: exact attention whatever the setting (the reference every method is compared to)."""

from __future__ import annotations

import torch

from drrl_env.flops import FlopsBreakdown
from drrl_env.methods.base import AttentionMethod, CallShape, Setting, exact_flops


class FullMethod(AttentionMethod):
    """Exact attention at every setting; its spectrum is flat (it computes none)."""

    name = "full"
    description = "exact attention at every rank (no spectrum: the energy features are flat)"
    has_fused = True

    def check_setting(self, setting: Setting) -> Setting:
        # Any rank of the grid is accepted and ignored.
        return super().check_setting(Setting(setting.rank, 1.0))

    def attend(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        return super().attend(state, query, key, value, mask, scaling, Setting(self.head_dim))

    def fused(self, state, query, key, value, mask, scaling, setting) -> torch.Tensor:
        """Exact causal attention in one FlexAttention kernel (the dense fused baseline the
        fused low-rank and block-sparse kernels are timed against)."""
        from drrl_env.methods.fused import fused_scores_attention

        return fused_scores_attention(query, key, value, scaling)

    def setting_flops(self, shape: CallShape, setting: Setting) -> FlopsBreakdown:
        return exact_flops(shape)

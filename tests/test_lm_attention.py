"""The ``drrl`` kernel and the controller: exact when exact, isolated per context, measured."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward as gpt2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from drrl_env.lm.attention import (
    ATTENTION_NAME,
    attention_modules,
    drrl_attention,
    install_input_hooks,
)
from drrl_env.lm.controller import AttentionController
from drrl_env.lm.measure import SweepProbe, TermProbe, loss_gradient
from drrl_env.lm.models import load_model
from drrl_env.lm.runner import LiveWindow, forward_with_cache, run_window
from drrl_env.methods import make_method, method_class, register_method, unregister_method
from drrl_env.methods.base import (
    AttentionMethod,
    CallShape,
    Setting,
    exact_attention,
    full_attention,
)

TOL = 1e-5
CONFIGS = ("plain", "full", "gram", "svd", "calibrated", "calibrated-kv", "topk")
SMOLLM2_TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat watches from the windowsill. "
    "Low-rank attention keeps only the leading directions of the query and key spaces, and a "
    "controller chooses how many of them each layer keeps on every segment of the window, "
    "trading a little fidelity of the attention output for fewer floating point operations."
)


@pytest.fixture(scope="module")
def references():
    """The tiny models with their own eager and sdpa attention (same seed, same weights)."""
    return {
        (name, impl): load_model(name, attn_implementation=impl)
        for name in ("tiny-llama", "tiny-gpt2")
        for impl in ("eager", "sdpa")
    }


def random_basis(lm, heads: int, seed: int = 0) -> torch.Tensor:
    """Random orthonormal (L, heads, d, d) basis."""
    generator = torch.Generator().manual_seed(seed)
    shape = (lm.n_layers, heads, lm.head_dim, lm.head_dim)
    return torch.linalg.qr(torch.randn(shape, generator=generator)).Q


def method_for(lm, name: str) -> AttentionMethod:
    """The method ``name`` for ``lm`` (random bases for the calibrated ones)."""
    cls = method_class(name)
    kwargs = {}
    if cls.needs_basis:
        kwargs["basis"] = random_basis(lm, lm.n_kv_heads if cls.scope == "kv_head" else lm.n_heads)
    return make_method(name, lm.head_dim, lm.n_layers, **kwargs)


def controller_for(lm, config: str) -> AttentionController | None:
    """A controller that must compute exact attention: ``full`` at any rank (here 1), or any
    other method at rank d (a sweep of rank 1 runs beside it and must not leak)."""
    if config == "plain":
        return None
    method = method_for(lm, config)
    rank = 1 if config == "full" else lm.head_dim
    controller = AttentionController(method, lm.n_layers, settings=rank)
    controller.probes = [TermProbe(), SweepProbe([controller.as_setting(1)])]
    install_input_hooks(lm.model)
    return controller


@contextmanager
def captured_attention(model):
    """Collect the output of every attention module, by layer."""
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda module, args, out: outputs.__setitem__(module.layer_idx, out[0])
        )
        for module in attention_modules(model)
    ]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def forward(lm, ids, mask=None):
    with captured_attention(lm.model) as outputs:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    return logits, outputs


def spy_on_kernel(monkeypatch) -> list[dict]:
    """Record the inputs and output of every call of the registered ``drrl`` kernel."""
    calls: list[dict] = []

    def spy(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        output, _ = drrl_attention(module, query, key, value, attention_mask, scaling, dropout)
        calls.append(
            dict(module=module, query=query, key=key, value=value, mask=attention_mask,
                 scaling=scaling, output=output)
        )  # fmt: skip
        return output, None

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION_NAME, spy)
    return calls


def assert_kernel_matches_transformers(calls: list[dict], keep: torch.Tensor | None) -> None:
    """Each kernel output (B, T, H, d) equals transformers' eager and sdpa kernels on its inputs.

    ``keep`` (B, T) selects the query rows compared with sdpa (padding rows are undefined).
    """
    assert calls
    for call in calls:
        module = call["module"]
        eager = gpt2_eager if "GPT2" in type(module).__name__ else llama_eager
        args = (module, call["query"], call["key"], call["value"], call["mask"])
        eager_output, _ = eager(*args, scaling=call["scaling"])
        sdpa_output, _ = sdpa_attention_forward(*args, scaling=call["scaling"])
        assert_close_where(call["output"], eager_output, keep)
        assert_close_where(call["output"], sdpa_output, keep)


def batch_inputs(padded: bool, length: int = 40) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1)
    if not padded:
        return torch.randint(0, 256, (1, length), generator=generator), None
    ids = torch.randint(1, 256, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding
    return ids, mask


def assert_close_where(
    a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None, tol: float = TOL
) -> None:
    """max |a - b| <= tol over positions (B, T, ...) where ``keep`` (B, T) is set."""
    diff = (a - b).abs()
    if keep is not None:
        diff = diff[keep.bool()]
    assert float(diff.max()) <= tol


@pytest.mark.parametrize("padded", [False, True], ids=["single", "left-padded"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_exact_settings_equal_eager_and_sdpa(
    request, monkeypatch, references, name, config, padded
):
    lm = request.getfixturevalue(name.replace("-", "_"))
    ids, mask = batch_inputs(padded)
    controller = controller_for(lm, config)
    calls = spy_on_kernel(monkeypatch)
    if controller is None:
        logits, outputs = forward(lm, ids, mask)
    else:
        with controller.activate():
            logits, outputs = forward(lm, ids, mask)
    assert len(calls) == lm.n_layers
    # Fully masked (padding) query rows are undefined in sdpa and in our exact path.
    assert_kernel_matches_transformers(calls, mask if controller is not None else None)
    for impl in ("eager", "sdpa"):
        ref_logits, ref_outputs = forward(references[name, impl], ids, mask)
        keep = mask if impl == "sdpa" or controller is not None else None
        assert_close_where(logits, ref_logits, keep)
        assert sorted(outputs) == sorted(ref_outputs) == list(range(lm.n_layers))
        for layer in outputs:
            assert_close_where(outputs[layer], ref_outputs[layer], keep)
    if controller is not None:  # the kernel really went through the controller
        assert len(controller.records) == lm.n_layers
        for record in controller.records:
            assert record.setting.is_exact(lm.head_dim) or config == "full"
            assert record.fidelity == 1.0
            features = controller.method.feature_flops(
                CallShape(ids.shape[1], ids.shape[1], lm.head_dim, lm.n_heads, lm.n_kv_heads,
                          batch=ids.shape[0])
            )  # fmt: skip
            assert record.flops == features + record.flops_full
            assert record.sweep["cosine"].shape == (1,)
        assert ACTIVE_IS_CLEAR()


def ACTIVE_IS_CLEAR() -> bool:  # noqa: N802 (reads like the assertion it makes)
    from drrl_env.lm.controller import ACTIVE

    return ACTIVE.get() is None


@pytest.mark.slow
def test_smollm2_exact_settings_equal_eager_and_sdpa(smollm2, monkeypatch):
    ids = torch.as_tensor(smollm2.tokenizer.encode(SMOLLM2_TEXT)[:64])[None]
    assert ids.shape[1] == 64
    calls = spy_on_kernel(monkeypatch)
    logits = smollm2.model(input_ids=ids).logits
    assert len(calls) == smollm2.n_layers
    assert_kernel_matches_transformers(calls, None)
    controller = controller_for(smollm2, "gram")
    with controller.activate():
        gram_logits = smollm2.model(input_ids=ids).logits
    assert len(controller.records) == smollm2.n_layers
    assert_close_where(gram_logits, logits, None, TOL * float(logits.abs().max()))
    # The model's own implementations on the same weights (no second copy of the model).
    reference = {}
    try:
        for impl in ("eager", "sdpa"):
            smollm2.model.set_attn_implementation(impl)
            reference[impl] = smollm2.model(input_ids=ids).logits
    finally:
        smollm2.model.set_attn_implementation(ATTENTION_NAME)
    assert smollm2.model.config._attn_implementation == ATTENTION_NAME
    assert_close_where(logits, reference["eager"], None)
    # sdpa sums in another order; over 30 layers float32 rounding reaches ~1e-5 of the logit
    # scale, so the whole-model comparison is relative (the per-kernel one above is absolute).
    assert_close_where(logits, reference["sdpa"], None, TOL * float(logits.abs().max()))


# -- the controller over a model -----------------------------------------------------------


def test_key_gram_over_model_kv_cache(tiny_llama):
    lm = tiny_llama
    controller = AttentionController(method_for(lm, "gram"), lm.n_layers, settings=8)
    install_input_hooks(lm.model)
    ids = torch.randint(0, 256, (1, 30))
    cache = None
    with controller.activate():
        for start in range(0, 30, 12):
            _, cache = forward_with_cache(lm.model, ids[:, start : start + 12], cache)
    for layer in range(lm.n_layers):
        keys = cache.layers[layer].keys  # (1, Hkv, 30, d)
        assert keys.shape[2] == 30
        torch.testing.assert_close(
            controller.states[layer]["key_gram"],
            keys.transpose(-1, -2) @ keys,
            rtol=1e-4,
            atol=1e-3,
        )


def test_sweep_fidelity_matches_executed_fidelity(tiny_llama):
    ranks = [4, 16, tiny_llama.head_dim]
    ids = torch.randint(0, 256, (48,))
    swept = run_window(tiny_llama, ids, 16, "gram", schedule=tiny_llama.head_dim, sweep=ranks)
    assert swept.sweep_fidelity.shape == (3, tiny_llama.n_layers, len(ranks))
    assert np.all(swept.sweep_fidelity[..., -1] == 1.0)
    # Teacher forcing: at segment 0 the layer inputs equal those of a run at that rank in layer 0.
    executed = run_window(tiny_llama, ids, 16, "gram", schedule=4)
    assert swept.sweep_fidelity[0, 0, 0] == pytest.approx(executed.fidelity[0, 0], abs=1e-6)


@pytest.mark.parametrize("name", ["gram", "svd", "calibrated", "topk"])
def test_recorded_flops_equal_the_method_count(tiny_llama, name):
    lm, seg = tiny_llama, 8
    d, layers = lm.head_dim, lm.n_layers
    method = method_for(lm, name)
    table = np.array([[8] * layers, [8] * layers, [d] * layers, [16] * layers])
    result = run_window(lm, torch.randint(0, 256, (4 * seg,)), seg, method, table, keep=0.5)
    for segment in range(4):
        shape = CallShape(seg, (segment + 1) * seg, d, lm.n_heads, lm.n_kv_heads, new_keys=seg)
        setting = Setting(int(table[segment, 0]), 0.5 if method.uses_keep else 1.0)
        if setting.rank == d:
            setting = Setting(d)
        expected = method.flops(shape, setting).total
        np.testing.assert_array_equal(result.flops[segment], float(expected))
        exact = make_method("full", d, 1).flops(shape, Setting(d)).total
        np.testing.assert_array_equal(result.flops_full[segment], float(exact))


D = 16


def test_controller_rejects_bad_settings():
    method = make_method("gram", D, 2)
    for rank in (0, D + 1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            AttentionController(method, 2, settings=rank)
        with pytest.raises(ValueError, match="rank"):
            AttentionController(method, 2, settings=[4, rank])
    with pytest.raises(ValueError, match="settings has 3 entries"):
        AttentionController(method, 2, settings=[1, 2, 3])
    with pytest.raises(ValueError, match="needs basis"):
        run_window(load_model("tiny-llama"), torch.arange(8), 4, "calibrated", 2)


def test_two_live_windows_on_one_model_do_not_mix(tiny_llama):
    """Interleaved closed-loop windows (two live envs in one process) keep their own state."""
    lm = tiny_llama
    tokens = [np.random.default_rng(seed).integers(0, 256, 48) for seed in (0, 1)]
    alone = [run_window(lm, t, 16, "gram", schedule=8) for t in tokens]
    lives = [LiveWindow(lm, t, 16, "gram") for t in tokens]
    requests = [live.start() for live in lives]
    while any(r is not None for r in requests):
        for i, live in enumerate(lives):
            if requests[i] is not None:
                _, requests[i] = live.step(8)
    for live, reference in zip(lives, alone, strict=True):
        assert live.result.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
        np.testing.assert_allclose(live.result.fidelity, reference.fidelity, atol=1e-6)


class NudgedOutput(AttentionMethod):
    """A toy method: exact attention plus ``epsilon`` times a fixed direction (rank ignored)."""

    name = "nudged"
    epsilon = 3e-4

    def reference(self, state, query, key, value, mask, scaling, setting):
        output = exact_attention(query, key, value, mask, scaling)
        if setting.is_exact(self.head_dim):
            return output
        generator = torch.Generator().manual_seed(state["layer"])
        direction = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        return output + self.epsilon * direction


def saved_for_backward(lm, tokens, **kwargs) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for the backward of :func:`loss_gradient`."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_gradient(lm, tokens, **kwargs)
    return shapes


def test_the_loss_gradient_keeps_no_attention_matrix_and_equals_the_eager_one(tiny_llama):
    """The fused kernel's backward keeps no (H, T, N) weights; its gradient is the eager one's."""
    lm = tiny_llama
    tokens = np.random.default_rng(5).integers(0, 256, 48)
    square = (lm.n_heads, len(tokens), len(tokens))  # one layer's attention weights
    assert not [s for s in saved_for_backward(lm, tokens) if s[-3:] == square]  # the default
    # the check can fail: the eager operations keep one such matrix per layer (at least)
    kept = [s for s in saved_for_backward(lm, tokens, attention=full_attention) if s[-3:] == square]
    assert len(kept) >= lm.n_layers
    fused, eager = loss_gradient(lm, tokens), loss_gradient(lm, tokens, full_attention)
    assert fused.mean_nll == pytest.approx(eager.mean_nll, rel=1e-6)
    for layer, (a, b) in enumerate(zip(fused.grads, eager.grads, strict=True)):
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()), msg=f"layer {layer}"
        )


def test_the_loss_gradient_predicts_the_loss_change_to_first_order(tiny_llama):
    """dnll_taylor of a small nudge of one cell equals the measured change of the mean loss."""
    lm = tiny_llama
    tokens = np.random.default_rng(3).integers(0, 256, 64)
    gradient = loss_gradient(lm, tokens)
    register_method("nudged", NudgedOutput)
    try:
        exact = run_window(lm, tokens, 32, "nudged")
        for segment, layer in ((0, 0), (1, 2), (0, 3)):
            table = np.full((2, lm.n_layers), lm.head_dim)
            table[segment, layer] = 1
            result = run_window(
                lm, tokens, 32, "nudged", table, terms=("cosine", "dnll_taylor"), gradient=gradient
            )
            measured = (result.nll_sum - exact.nll_sum) / result.n_predicted
            predicted = result.terms["dnll_taylor"][segment, layer]
            assert result.terms["dnll_taylor"].sum() == pytest.approx(predicted)
            assert predicted == pytest.approx(measured, rel=0.06), (segment, layer)
    finally:
        unregister_method("nudged")
    assert gradient.mean_nll == pytest.approx(exact.nll_sum / exact.n_predicted, rel=1e-5)

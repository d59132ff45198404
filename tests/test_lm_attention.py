"""The ``drrl`` kernel and RankController: exact at full rank, really low rank below it."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward as gpt2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from drrl_env.flops import full_attention_flops, lowrank_attention_flops
from drrl_env.lm.attention import (
    ATTENTION_NAME,
    RankController,
    attention_modules,
    basis_attention,
    drrl_attention,
    output_cosine,
    repeat_kv,
    svd_attention,
)
from drrl_env.lm.models import load_model
from drrl_env.lm.runner import forward_with_cache, run_window
from drrl_env.spectra import normalize_spectrum

TOL = 1e-5
CONFIGS = ("plain", "full", "gram", "svd", "calibrated")
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


def random_basis(lm, seed: int = 0) -> torch.Tensor:
    """Random orthonormal (L, H, d, d) basis."""
    generator = torch.Generator().manual_seed(seed)
    shape = (lm.n_layers, lm.n_heads, lm.head_dim, lm.head_dim)
    return torch.linalg.qr(torch.randn(shape, generator=generator)).Q


def controller_for(lm, config: str) -> RankController | None:
    """A controller that must reproduce exact attention.

    Method full at any rank (here 1), or any other method at rank d.
    """
    if config == "plain":
        return None
    basis = random_basis(lm) if config == "calibrated" else None
    rank = 1 if config == "full" else lm.head_dim
    return RankController(
        lm.n_layers, lm.head_dim, method=config, ranks=rank, basis=basis, sweep_ranks=[1]
    )


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
        assert_close_where(call["output"], eager_output, None)
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
def test_full_rank_equals_eager_and_sdpa(request, monkeypatch, references, name, config, padded):
    lm = request.getfixturevalue(name.replace("-", "_"))
    ids, mask = batch_inputs(padded)
    controller = controller_for(lm, config)
    if controller is not None:
        controller.attach(lm.model)
    calls = spy_on_kernel(monkeypatch)
    try:
        logits, outputs = forward(lm, ids, mask)
    finally:
        if controller is not None:
            controller.detach(lm.model)
    assert len(calls) == lm.n_layers
    assert_kernel_matches_transformers(calls, mask)
    for impl in ("eager", "sdpa"):
        ref_logits, ref_outputs = forward(references[name, impl], ids, mask)
        # sdpa leaves fully masked (padding) query rows undefined; eager must agree everywhere.
        keep = mask if impl == "sdpa" else None
        assert_close_where(logits, ref_logits, keep)
        assert sorted(outputs) == sorted(ref_outputs) == list(range(lm.n_layers))
        for layer in outputs:
            assert_close_where(outputs[layer], ref_outputs[layer], keep)
    if controller is not None:  # the kernel really went through the controller
        assert len(controller.records) == lm.n_layers
        rank = controller.rank_of_layer(0)
        assert all(record.rank == rank for record in controller.records)
        assert all(record.fidelity == 1.0 for record in controller.records)
        assert all(record.flops == record.flops_full for record in controller.records)


@pytest.mark.slow
def test_smollm2_full_rank_equals_eager_and_sdpa(smollm2, monkeypatch):
    ids = torch.as_tensor(smollm2.tokenizer.encode(SMOLLM2_TEXT)[:64])[None]
    assert ids.shape[1] == 64
    calls = spy_on_kernel(monkeypatch)
    logits = smollm2.model(input_ids=ids).logits
    assert len(calls) == smollm2.n_layers
    assert_kernel_matches_transformers(calls, None)
    controller = controller_for(smollm2, "gram").attach(smollm2.model)
    try:
        gram_logits = smollm2.model(input_ids=ids).logits
    finally:
        controller.detach(smollm2.model)
    assert len(controller.records) == smollm2.n_layers
    assert_close_where(gram_logits, logits, None)
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


# -- kernel level: random tensors ----------------------------------------------------------

B, H, HKV, T, N, D = 2, 4, 2, 6, 10, 16
# The kernels take the softmax in float32 (as transformers' eager path does), also for float64.
SOFTMAX_TOL = dict(rtol=1e-5, atol=1e-6)


def structured_qk(
    seed: int = 0, dtype=torch.float64, decay: float = 0.7, scale: float = 6.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (B, H, T, d), keys and values (B, Hkv, N, d) sharing a decaying spectrum.

    Both live mostly in the same leading directions, so attention is sharp and its rank-r
    approximations improve steadily with r.
    """
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=dtype)).Q
    spectrum = scale * decay ** torch.arange(D, dtype=dtype)  # (d,)
    query = torch.randn(B, H, T, D, generator=generator, dtype=dtype) * spectrum @ mixing.T
    key = torch.randn(B, HKV, N, D, generator=generator, dtype=dtype) * spectrum @ mixing.T
    value = torch.randn(B, HKV, N, D, generator=generator, dtype=dtype)
    causal = torch.ones(T, N, dtype=torch.bool).tril(N - T)
    mask = torch.zeros(B, 1, T, N, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    return query, key, value, mask


def reference_attention(scores, value, mask) -> torch.Tensor:
    """softmax(scores + mask) V with kv heads repeated by hand."""
    groups = scores.shape[1] // value.shape[1]
    weights = F.softmax(scores + mask, dim=-1)
    return weights @ value.repeat_interleave(groups, dim=1)  # (B, H, T, d)


def test_basis_attention_is_hand_computation():
    query, key, value, mask = structured_qk()
    rank, scaling = 5, D**-0.5
    basis = torch.linalg.qr(torch.randn(H, D, rank, dtype=torch.float64)).Q  # (H, d, r)
    keys = key.repeat_interleave(H // HKV, dim=1)  # (B, H, N, d)
    projected = (query @ basis) @ (keys @ basis).transpose(-1, -2)  # (B, H, T, N)
    # Same scores as from full-size rank-r reconstructions Q P P^T and K P P^T.
    projector = basis @ basis.transpose(-1, -2)  # (H, d, d)
    reconstructed = (query @ projector) @ (keys @ projector).transpose(-1, -2)
    torch.testing.assert_close(projected, reconstructed)
    expected = reference_attention(projected * scaling, value, mask)
    actual = basis_attention(query, key, value, mask, scaling, basis[None])
    torch.testing.assert_close(actual, expected, **SOFTMAX_TOL)


@pytest.mark.parametrize("queries", [T, 3])
def test_svd_attention_is_truncated_reconstruction(queries):
    query, key, value, mask = structured_qk(seed=2)
    query, mask = query[:, :, -queries:], mask[:, :, -queries:]
    rank, scaling = 4, D**-0.5

    def truncated(x: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]

    query_r = truncated(query)  # (B, H, T, d); equals query when T <= rank
    key_r = truncated(key).repeat_interleave(H // HKV, dim=1)  # (B, H, N, d)
    expected = reference_attention(query_r @ key_r.transpose(-1, -2) * scaling, value, mask)
    actual = svd_attention(query, key, value, mask, scaling, rank)
    torch.testing.assert_close(actual, expected, **SOFTMAX_TOL)


@pytest.fixture
def matmul_shapes(monkeypatch):
    """Record the operand shapes of every torch.matmul call."""
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    original = torch.matmul

    def spy(a, b, *args, **kwargs):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", spy)
    return seen


@pytest.mark.parametrize("method", ["gram", "svd", "calibrated", "full"])
def test_scores_are_computed_at_inner_dimension_rank(matmul_shapes, method):
    query, key, value, mask = (x.float() for x in structured_qk())
    rank = 3
    basis = torch.linalg.qr(torch.randn(1, H, D, D)).Q if method == "calibrated" else None
    controller = RankController(1, D, method=method, ranks=rank, basis=basis, record=False)
    controller.attend(0, query, key, value, mask, D**-0.5)
    # The (T x N) score matmuls and the inner dimension they ran at.
    score_inner = [a[-1] for a, b in matmul_shapes if a[-2] == T and b[-1] == N]
    assert score_inner == ([D] if method == "full" else [rank])
    # Nothing else multiplies full-size queries (T, d) by full-size keys (d, N).
    full_scores = [(a, b) for a, b in matmul_shapes if a[-2:] == (T, D) and b[-2:] == (D, N)]
    assert len(full_scores) == (method == "full")


def test_gram_basis_is_top_eigenvectors():
    query, key, value, mask = structured_qk(seed=3)
    rank, scaling = 4, D**-0.5
    controller = RankController(1, D, method="gram", ranks=rank)
    output = controller.attend(0, query, key, value, mask, scaling)
    keys = key.repeat_interleave(H // HKV, dim=1)
    gram = query.transpose(-1, -2) @ query + keys.transpose(-1, -2) @ keys  # (B, H, d, d)
    values, vectors = np.linalg.eigh(gram.numpy())
    top = torch.from_numpy(vectors[..., ::-1][..., :rank].copy())  # (B, H, d, r)
    expected = reference_attention(
        (query @ top) @ (keys @ top).transpose(-1, -2) * scaling, value, mask
    )
    torch.testing.assert_close(output, expected, **SOFTMAX_TOL)
    spectrum = normalize_spectrum(values).reshape(-1, D).mean(axis=0)
    np.testing.assert_allclose(
        controller.records[0].spectrum, spectrum / spectrum.sum(), atol=1e-12
    )
    full = reference_attention(query @ keys.transpose(-1, -2) * scaling, value, mask)
    assert controller.records[0].fidelity == pytest.approx(output_cosine(output, full), abs=1e-7)
    assert controller.records[0].fidelity < 1.0


def test_key_gram_accumulates_over_segments():
    """Two calls over a growing KV cache: the Gram is updated with the new keys only."""
    query, key, value, mask = structured_qk(seed=4)
    first, rank, scaling = 4, 3, D**-0.5
    controller = RankController(1, D, method="gram", ranks=rank)
    controller.attend(0, query[:, :, :first], key[:, :, :first], value[:, :, :first], None, scaling)
    rest = N - first
    output = controller.attend(0, query[:, :, -rest:], key, value, mask[:, :, -rest:], scaling)
    state = controller._states[0]
    torch.testing.assert_close(state.key_gram, key.transpose(-1, -2) @ key)  # (B, Hkv, d, d)
    # The second call used Q_2^T Q_2 + K^T K over all keys, as a fresh controller would.
    fresh = RankController(1, D, method="gram", ranks=rank)
    expected = fresh.attend(0, query[:, :, -rest:], key, value, mask[:, :, -rest:], scaling)
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-11)
    # A cache that does not continue the previous one (new sequence) is recomputed.
    other = key[:, :, :5].flip(2).contiguous()
    controller.attend(0, query[:, :, :5], other, value[:, :, :5], None, scaling)
    torch.testing.assert_close(state.key_gram, other.transpose(-1, -2) @ other)


def test_key_gram_over_model_kv_cache(tiny_llama):
    lm = tiny_llama
    controller = RankController(lm.n_layers, lm.head_dim, method="gram", ranks=8)
    controller.attach(lm.model)
    ids = torch.randint(0, 256, (1, 30))
    cache = None
    try:
        for start in range(0, 30, 12):
            _, cache = forward_with_cache(lm.model, ids[:, start : start + 12], cache)
    finally:
        controller.detach(lm.model)
    for layer in range(lm.n_layers):
        keys = cache.layers[layer].keys  # (1, Hkv, 30, d)
        assert keys.shape[2] == 30
        torch.testing.assert_close(
            controller._states[layer].key_gram, keys.transpose(-1, -2) @ keys, rtol=1e-4, atol=1e-3
        )


@pytest.mark.parametrize("method", ["gram", "svd", "calibrated"])
def test_fidelity_weakly_decreases_with_rank(method):
    query, key, value, mask = (x.float() for x in structured_qk(seed=5, scale=8.0))
    basis = None
    if method == "calibrated":  # eigenbasis of this very input, averaged over the batch
        keys = repeat_kv(key, H // HKV)
        gram = (query.transpose(-1, -2) @ query + keys.transpose(-1, -2) @ keys).sum(0)
        basis = torch.linalg.eigh(gram.double()).eigenvectors.flip(-1).float()[None]
    ranks = list(range(1, D + 1))
    controller = RankController(1, D, method=method, ranks=D, sweep_ranks=ranks, basis=basis)
    controller.attend(0, query, key, value, mask, D**-0.5)
    fidelity = controller.records[0].sweep_fidelity
    assert fidelity.shape == (D,)
    assert fidelity[-1] == 1.0
    assert fidelity[0] < 0.95  # structured attention: rank 1 is clearly worse
    assert np.all(np.diff(fidelity) >= -1e-4), fidelity


def test_sweep_fidelity_matches_executed_fidelity(tiny_llama):
    ranks = [4, 16, tiny_llama.head_dim]
    ids = torch.randint(0, 256, (48,))
    swept = run_window(tiny_llama, ids, 16, "gram", schedule=tiny_llama.head_dim, sweep_ranks=ranks)
    assert swept.sweep_fidelity.shape == (3, tiny_llama.n_layers, len(ranks))
    assert np.all(swept.sweep_fidelity[..., -1] == 1.0)
    # Teacher forcing: at segment 0 the layer inputs equal those of a run at that rank in layer 0.
    executed = run_window(tiny_llama, ids, 16, "gram", schedule=4)
    assert swept.sweep_fidelity[0, 0, 0] == pytest.approx(executed.fidelity[0, 0], abs=1e-6)


@pytest.mark.parametrize("method", ["gram", "svd", "calibrated"])
def test_recorded_flops_equal_accounting(tiny_llama, method):
    lm, rank, seg = tiny_llama, 8, 8
    d, layers = lm.head_dim, lm.n_layers
    table = np.array([[rank] * layers, [rank] * layers, [d] * layers, [rank] * layers])
    basis = random_basis(lm) if method == "calibrated" else None
    result = run_window(lm, torch.randint(0, 256, (4 * seg,)), seg, method, table, basis=basis)
    # gram keeps K^T K incrementally: a following gram segment adds only its T new keys; after
    # a full-rank segment the Gram is rebuilt from all N keys.
    new_keys = [seg, seg, None, 4 * seg]
    for segment in range(4):
        keys = (segment + 1) * seg
        expected = lowrank_attention_flops(
            seg,
            keys,
            d,
            int(table[segment, 0]),
            method,
            heads=lm.n_heads,
            kv_heads=lm.n_kv_heads,
            new_keys=new_keys[segment],
        )
        full = full_attention_flops(seg, keys, d, heads=lm.n_heads)
        np.testing.assert_array_equal(result.flops[segment], float(expected.total))
        np.testing.assert_array_equal(result.flops_full[segment], float(full.total))
    assert result.flops[2].tolist() == result.flops_full[2].tolist()


def test_recorded_flops_scale_with_batch():
    query, key, value, mask = (x.float() for x in structured_qk())
    controller = RankController(1, D, method="gram", ranks=3)
    controller.attend(0, query, key, value, mask, D**-0.5)
    one = lowrank_attention_flops(T, N, D, 3, "gram", heads=H, kv_heads=HKV)
    assert controller.records[0].flops.total == B * one.total


@pytest.mark.parametrize("rank", [0, D + 1, 2.5, True])
def test_controller_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        RankController(1, D, method="gram", ranks=rank)
    with pytest.raises(ValueError, match="rank"):
        RankController(2, D, method="gram", ranks=[4, rank])
    with pytest.raises(ValueError, match="rank"):
        RankController(1, D, method="gram", sweep_ranks=[rank])


def test_controller_rejects_bad_configuration():
    with pytest.raises(ValueError, match="full.*svd.*gram.*calibrated"):
        RankController(1, D, method="pca")
    with pytest.raises(ValueError, match="basis"):
        RankController(1, D, method="calibrated", ranks=2)
    with pytest.raises(ValueError, match="basis"):
        RankController(2, D, method="calibrated", basis=torch.zeros(1, H, D, D))
    with pytest.raises(ValueError, match="ranks has 3 entries"):
        RankController(2, D, ranks=[1, 2, 3])

"""Calibrated bases: what they diagonalise, how they run, how they are stored."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from drrl_env.lm.calibration import calibrate_basis, load_basis, save_basis
from drrl_env.lm.controller import AttentionController
from drrl_env.lm.runner import run_window
from drrl_env.methods.base import repeat_kv


def windows(n: int, length: int, seed: int = 0, vocab: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, length))


def basis_shape(lm, scope: str = "kv_head") -> tuple[int, int, int, int]:
    heads = lm.n_kv_heads if scope == "kv_head" else lm.n_heads
    return (lm.n_layers, heads, lm.head_dim, lm.head_dim)


def random_basis(lm, seed: int = 0, scope: str = "kv_head") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(basis_shape(lm, scope), generator=generator)).Q


@pytest.fixture(scope="module")
def llama_basis(tiny_llama) -> torch.Tensor:
    return calibrate_basis(tiny_llama, windows(2, 32), segment_length=16, progress=False)


@pytest.mark.parametrize("scope", ["kv_head", "query_head"])
def test_basis_is_orthonormal(tiny_llama, scope):
    basis = calibrate_basis(tiny_llama, windows(2, 32), 16, progress=False, scope=scope)
    assert basis.shape == basis_shape(tiny_llama, scope)
    assert basis.dtype == torch.float32
    eye = torch.eye(tiny_llama.head_dim).expand(basis_shape(tiny_llama, scope))
    gram = basis.transpose(-1, -2) @ basis  # (L, heads, d, d)
    torch.testing.assert_close(gram, eye, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scope", ["kv_head", "query_head"])
def test_basis_diagonalises_the_summed_gram(tiny_llama, monkeypatch, scope):
    """query_head: eigenvectors of Q^T Q + K^T K per query head (each key counted once, when it
    enters the cache, in its kv head's K^T K); kv_head: of those summed over the kv head's
    query heads."""
    lm = tiny_llama
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = AttentionController.attend

    def spy(self, layer, query, key, value, mask, scaling):
        calls.append((layer, query.double(), key.double()))
        return original(self, layer, query, key, value, mask, scaling)

    monkeypatch.setattr(AttentionController, "attend", spy)
    basis = calibrate_basis(lm, windows(2, 24, seed=1), 10, progress=False, scope=scope)
    assert len(calls) == 2 * 3 * lm.n_layers  # windows x segments x layers
    expected = torch.zeros(basis_shape(lm, scope), dtype=torch.float64)
    groups = lm.n_heads // lm.n_kv_heads
    for layer, query, key in calls:
        assert key.shape[2] in (10, 20, 24)  # the KV cache grows within a window
        fresh = key[:, :, -(key.shape[2] - {10: 0, 20: 10, 24: 20}[key.shape[2]]) :]
        key_gram = fresh.transpose(-1, -2) @ fresh  # (1, Hkv, d, d)
        per_query_head = (query.transpose(-1, -2) @ query + repeat_kv(key_gram, groups))[0]
        if scope == "kv_head":
            expected[layer] += per_query_head.reshape(
                lm.n_kv_heads, groups, *per_query_head.shape[1:]
            ).sum(1)
        else:
            expected[layer] += per_query_head
    rotated = basis.double().transpose(-1, -2) @ expected @ basis.double()
    diagonal = torch.diagonal(rotated, dim1=-2, dim2=-1)  # (L, heads, d)
    off = rotated - torch.diag_embed(diagonal)
    scale = diagonal[..., :1, None]  # the largest eigenvalue per (layer, head)
    assert float((off.abs() / scale).max()) < 1e-4
    # Columns by decreasing eigenvalue, and the eigenvalues are those of the summed Gram.
    assert torch.all(diagonal[..., 1:] <= diagonal[..., :-1] + 1e-5 * scale[..., 0])
    torch.testing.assert_close(
        diagonal / scale[..., 0],
        torch.linalg.eigvalsh(expected).flip(-1) / scale[..., 0],
        rtol=0,
        atol=1e-5,
    )


def test_query_head_basis_on_the_window_equals_gram(tiny_llama):
    """One window in one segment: the query-head calibration Gram is the one ``gram`` decomposes.

    Only the last layer runs at low rank, so the inputs of every low-rank layer are those of
    the exact calibration pass.
    """
    lm, rank = tiny_llama, 8
    tokens = windows(1, 40, seed=2)
    basis = calibrate_basis(lm, tokens, segment_length=40, progress=False, scope="query_head")
    table = np.full((1, lm.n_layers), lm.head_dim)
    table[0, -1] = rank
    calibrated = run_window(lm, tokens[0], 40, "calibrated", table, basis=basis)
    gram = run_window(lm, tokens[0], 40, "gram", table)
    assert calibrated.fidelity[0, -1] < 1.0
    assert calibrated.fidelity[0, -1] == pytest.approx(gram.fidelity[0, -1], abs=1e-5)
    assert calibrated.perplexity == pytest.approx(gram.perplexity, rel=1e-5)


def test_calibrated_beats_a_random_basis(tiny_llama, llama_basis):
    lm, tokens, rank = tiny_llama, windows(1, 48, seed=3)[0], 4
    calibrated = run_window(lm, tokens, 16, "calibrated-kv", rank, basis=llama_basis)
    random = run_window(lm, tokens, 16, "calibrated-kv", rank, basis=random_basis(lm))
    assert calibrated.mean_fidelity > random.mean_fidelity
    # The fixed basis costs no basis search.
    gram = run_window(lm, tokens, 16, "gram", rank)
    assert np.all(calibrated.flops < gram.flops)


def test_calibration_is_deterministic(tiny_gpt2):
    first = calibrate_basis(tiny_gpt2, windows(2, 20), 8, progress=False)
    second = calibrate_basis(tiny_gpt2, windows(2, 20), 8, progress=False)
    assert torch.equal(first, second)


def test_progress_bar_over_windows(tiny_gpt2, capsys):
    calibrate_basis(tiny_gpt2, windows(3, 8), 8, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "3/3" in err


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(16, dtype=int), "shape"),
        (np.zeros((0, 16), dtype=int), "shape"),
        (np.zeros((1, 1), dtype=int), "at least 2 tokens"),
        (np.zeros((1, 1025), dtype=int), "context"),
    ],
)
def test_bad_windows(tiny_gpt2, bad, match):
    with pytest.raises(ValueError, match=match):
        calibrate_basis(tiny_gpt2, bad, 8, progress=False)


@pytest.mark.parametrize("segment_length", [0, 1.5])
def test_bad_segment_length(tiny_gpt2, segment_length):
    with pytest.raises(ValueError, match="segment_length"):
        calibrate_basis(tiny_gpt2, windows(1, 8), segment_length, progress=False)


# -- files -------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tiny_llama, llama_basis, tmp_path):
    path = tmp_path / "bases" / "tiny-llama.pt"
    written = save_basis(path, llama_basis, tiny_llama.name, metadata={"windows": 2})
    assert written == path
    assert [p.name for p in path.parent.iterdir()] == ["tiny-llama.pt"]  # no temp file left
    loaded = load_basis(path, expected_model="tiny-llama", expected_shape=basis_shape(tiny_llama))
    assert torch.equal(loaded, llama_basis)
    assert torch.equal(load_basis(path), llama_basis)
    # Overwriting replaces the file.
    save_basis(path, llama_basis * 0, tiny_llama.name)
    assert torch.equal(load_basis(path), llama_basis * 0)
    assert len(list(path.parent.iterdir())) == 1


def test_loading_for_another_model_or_shape(tiny_llama, tiny_gpt2, llama_basis, tmp_path):
    path = save_basis(tmp_path / "basis.pt", llama_basis, tiny_llama.name)
    with pytest.raises(ValueError, match="tiny-llama.*tiny-gpt2"):
        load_basis(path, expected_model="tiny-gpt2")
    gpt2_shape = basis_shape(tiny_gpt2)
    both = re.escape(str(tuple(llama_basis.shape))) + ".*" + re.escape(str(gpt2_shape))
    with pytest.raises(ValueError, match=both):
        load_basis(path, expected_shape=gpt2_shape)


def test_basis_of_another_model_is_refused_by_the_runner(tiny_llama, tiny_gpt2):
    gpt2_basis = calibrate_basis(tiny_gpt2, windows(1, 16), 8, progress=False)
    with pytest.raises(ValueError, match="basis"):
        run_window(tiny_llama, windows(1, 16)[0], 8, "calibrated", 4, basis=gpt2_basis)
    with pytest.raises(ValueError, match="scope"):
        calibrate_basis(tiny_gpt2, windows(1, 16), 8, progress=False, scope="layer")


def test_not_a_basis_file(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a basis file"):
        load_basis(path)
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable basis file"):
        load_basis(path)
    with pytest.raises(FileNotFoundError):
        load_basis(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="shape"):
        save_basis(tmp_path / "flat.pt", torch.zeros(4, 4), "tiny-llama")


@pytest.mark.slow
def test_smollm2_calibrated_basis(smollm2):
    text = (
        "A calibrated basis is estimated once from a few windows of ordinary text and then "
        "reused for every window, so the low-rank attention pays nothing to find its subspace."
    )
    tokens = np.asarray(smollm2.tokenizer.encode(text)[:32])[None]
    basis = calibrate_basis(smollm2, tokens, 16, progress=False, scope="query_head")
    assert basis.shape == basis_shape(smollm2, "query_head")
    other = smollm2.tokenizer.encode("The cat sat on the mat and looked out of the window.")
    calibrated = run_window(smollm2, other, 16, "calibrated", 16, basis=basis)
    random = run_window(
        smollm2, other, 16, "calibrated", 16, basis=random_basis(smollm2, scope="query_head")
    )
    assert calibrated.mean_fidelity > random.mean_fidelity

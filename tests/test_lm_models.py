"""load_model: tiny models, the embedded SmolLM2, local folders and names that do not resolve."""

from __future__ import annotations

import time

import pytest
import torch

from drrl_env.lm.attention import ATTENTION_NAME, attention_modules
from drrl_env.lm.models import (
    EMBEDDED_MODEL,
    TINY_MODELS,
    ByteTokenizer,
    ModelNotAvailableError,
    load_model,
)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_are_frozen_and_routed_through_drrl(request, name):
    lm = request.getfixturevalue(name.replace("-", "_"))
    assert lm.name == name
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.model.config._attn_implementation == ATTENTION_NAME
    assert len(attention_modules(lm.model)) == lm.n_layers
    assert lm.n_heads % lm.n_kv_heads == 0
    assert all(module.head_dim == lm.head_dim for module in attention_modules(lm.model))
    assert isinstance(lm.tokenizer, ByteTokenizer)
    assert lm.device == torch.device("cpu")


def test_tiny_shapes(tiny_llama, tiny_gpt2):
    assert tiny_llama.n_kv_heads < tiny_llama.n_heads  # grouped-query attention
    assert tiny_gpt2.n_kv_heads == tiny_gpt2.n_heads
    assert tiny_gpt2.max_positions == 1024
    assert tiny_gpt2.head_dim == tiny_gpt2.config.n_embd // tiny_gpt2.n_heads


def test_tiny_weights_depend_only_on_seed():
    a = load_model("tiny-llama", seed=3)
    torch.manual_seed(12345)  # the global generator must not matter
    b = load_model("tiny-llama", seed=3, attn_implementation="eager")
    c = load_model("tiny-llama", seed=4)
    for (name, pa), (_, pb) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_load_model_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_model("tiny-gpt2")
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("naïve ✓")
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == "naïve ✓"


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_empty_or_non_string_name(name):
    with pytest.raises(ValueError, match="non-empty"):
        load_model(name)


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "definitely-not-a-model"])
def test_unknown_model_fails_fast_offline(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(name)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert repr(name) in message
    assert EMBEDDED_MODEL in message and "save_pretrained" in message and "download" in message


def test_local_folder_without_model_files(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="local folder"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_local_folder_loads(smollm2, tiny_llama, monkeypatch, tmp_path):
    """A folder saved with save_pretrained (model and a tokenizer) loads by its path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.model.config._attn_implementation == ATTENTION_NAME
    assert not loaded.model.training
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(
        loaded.model(input_ids=ids).logits, tiny_llama.model(input_ids=ids).logits
    )


@pytest.mark.slow
def test_smollm2_facts(smollm2):
    assert smollm2.name == EMBEDDED_MODEL
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads, smollm2.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert smollm2.max_positions >= 2048
    assert smollm2.model.config._attn_implementation == ATTENTION_NAME
    assert all(not p.requires_grad for p in smollm2.model.parameters())
    text = "Low-rank attention."
    ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
    assert smollm2.tokenizer.decode(ids) == text
    # A trained model: the continuation of an obvious pattern is predicted.
    prompt = smollm2.tokenizer.encode("The capital of France is", add_special_tokens=False)
    logits = smollm2.model(input_ids=torch.as_tensor(prompt)[None]).logits[0, -1]
    assert smollm2.tokenizer.decode([int(logits.argmax())]).strip() == "Paris"

"""Shared fixtures: tiny models load in well under a second; SmolLM2 tests are marked slow."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tests use small tensors: one intra-op thread is fastest and never stalls on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llama():
    from drrl_env.lm.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from drrl_env.lm.models import load_model

    return load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2():
    from drrl_env.lm.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A cache folder shared by the tests of a session (tiny-model rollouts build once)."""
    return str(tmp_path_factory.getbasetemp() / "agents-cache")


@pytest.fixture(scope="module")
def env(cache_root):
    """The tiny environment with two windows, one instance per test module."""
    import gymnasium as gym

    import drrl_env  # noqa: F401 (registers the ids)

    return gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2)

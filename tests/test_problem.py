"""The Problem: built once from a config, shared by the env and its backend, lazy."""

from __future__ import annotations

import numpy as np
import pytest

import drrl_env  # noqa: F401 (registers the ids)
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.envs.problem import Problem
from drrl_env.lm.facts import ModelShape

TINY = {"model": "tiny-llama", "seq_len": 512, "segment_length": 128, "max_windows": 2}


def test_env_and_backend_share_one_problem(cache_root):
    env = DynamicRankEnv(EnvConfig(**TINY, cache_dir=cache_root))
    problem = env.problem
    assert env.backend.problem is problem and problem.config is env.config
    assert env.actions is problem.actions and env.costs is problem.costs
    assert env.wall is problem.wall is None and env.reward_function is problem.reward
    assert env.steps == problem.steps == problem.shape.n_layers * env.config.n_segments


def test_a_complete_cache_serves_without_loading_the_model(cache_root, monkeypatch):
    config = EnvConfig(**TINY, cache_dir=cache_root)
    built = DynamicRankEnv(config)
    import drrl_env.envs.problem as module

    monkeypatch.setattr(module, "shared_model", lambda *a: pytest.fail("loaded the model"))
    again = DynamicRankEnv(config)
    assert "lm" not in again.problem.__dict__
    assert again.problem.shape == built.problem.shape
    np.testing.assert_array_equal(again.problem.weight_stats, built.problem.weight_stats)
    np.testing.assert_array_equal(again.costs.executed, built.costs.executed)


def test_the_stored_facts_equal_the_measured_ones(cache_root):
    config = EnvConfig(**TINY, cache_dir=cache_root)
    cached = DynamicRankEnv(config).problem
    measured = Problem(config)  # reads the model
    assert measured.shape == cached.shape
    np.testing.assert_array_equal(measured.weight_stats, cached.weight_stats)
    np.testing.assert_array_equal(measured.costs.executed, cached.costs.executed)
    np.testing.assert_array_equal(measured.costs.full, cached.costs.full)
    assert measured.actions == cached.actions


def test_costs_are_the_methods_flops_per_segment(cache_root):
    from drrl_env.methods.base import CallShape, exact_flops

    problem = Problem(EnvConfig(**TINY, method="topk", keeps=(0.25, 0.5), cache_dir=cache_root))
    shape = problem.shape
    for segment in range(problem.config.n_segments):
        call = CallShape(
            128, (segment + 1) * 128, shape.head_dim, shape.n_heads, shape.n_kv_heads, new_keys=128
        )
        assert problem.costs.full[segment] == exact_flops(call).total
        for index, setting in enumerate(problem.actions.settings):
            expected = problem.counting_method.flops(call, setting).total
            assert problem.costs.executed[segment, index] == expected


def test_adopt_refuses_facts_that_contradict_the_model(cache_root):
    problem = Problem(EnvConfig(**TINY, cache_dir=cache_root))
    shape, stats = problem.shape, problem.weight_stats
    problem.adopt(shape, stats.copy())  # the same facts: accepted
    with pytest.raises(ValueError, match="stored shape differs"):
        problem.adopt(ModelShape(shape.n_layers + 1, *shape.as_array()[1:].tolist()), stats)
    with pytest.raises(ValueError, match="stored weight_stats differs"):
        problem.adopt(shape, stats + 1.0)


def test_a_problem_needs_a_config_and_a_window_that_fits():
    with pytest.raises(TypeError, match="from an EnvConfig, not dict"):
        Problem(TINY)
    long = Problem(EnvConfig(**{**TINY, "seq_len": 1 << 20}))
    with pytest.raises(ValueError, match="longer than the context of tiny-llama"):
        long.check_context()

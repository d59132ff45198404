"""The Gymnasium environment on the tiny model: API, checkers, determinism, backends, masks."""

from __future__ import annotations

import pickle
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import drrl_env
from drrl_env.envs.backends.cached import RolloutCache
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.replay import ReplayMismatch, actions_of, live_env, replay, validate

TINY = drrl_env.ENV_IDS["DRRL-Tiny-v0"]
STEPS = 16  # 4 segments x 4 layers


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("drrl-cache"))


@pytest.fixture(scope="module")
def tiny_env(cache_root):
    return gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=4)


@pytest.fixture(scope="module")
def tiny_live(cache_root):
    return DynamicRankEnv(**{**TINY, "max_windows": 4}, backend="live", cache_dir=cache_root)


def rollout(env, actions, window=0):
    observation, _ = env.reset(options={"window": window})
    trace = [observation]
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        trace.append((observation, reward, terminated, truncated, info))
    return trace


def test_import_registers_ids_without_torch():
    code = (
        "import sys, drrl_env, gymnasium as gym; gym.spec('DRRL-Wikitext-v0'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registered_ids_and_their_meaning():
    assert {"DRRL-Wikitext-v0", "DRRL-Wikitext-Live-v0", "DRRL-Wikitext-SVD-v0"} <= set(
        drrl_env.ENV_IDS
    )
    assert drrl_env.ENV_IDS["DRRL-Wikitext-v0"] == {"backend": "cached"}  # gram, cosine
    assert drrl_env.ENV_IDS["DRRL-Wikitext-TopK-v0"]["method"] == "topk"
    assert drrl_env.ENV_IDS["DRRL-Wikitext-Budget-v0"]["budget"] == 0.6
    for env_id in drrl_env.ENV_IDS:
        assert gym.spec(env_id).max_episode_steps is None  # episodes end themselves


def test_spaces_and_episode_length(tiny_env):
    env = tiny_env.unwrapped
    assert env.ranks == (8, 16, 24, 32, 40, 48, 56, 64)
    assert env.action_space == gym.spaces.Discrete(8)
    assert env.observation_space.shape == (env.layout.size,) == (11 + 3 * 8,)
    assert env.observation_space.dtype == np.float32
    trace = rollout(tiny_env, [7] * STEPS)
    assert [step[2] for step in trace[1:]] == [False] * 15 + [True]
    assert not any(step[3] for step in trace[1:])
    summary = trace[-1][4]["episode_summary"]
    # Exact attention still pays the observation's features (rotating each new key once).
    assert 0 > summary["flops_reduction"] > -0.2
    assert summary["mean_fidelity"] == pytest.approx(1.0)
    assert np.array(summary["ranks"]).shape == (4, 4)


def test_episode_length_follows_the_configuration_whatever_the_kwargs(cache_root):
    env = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=1, seq_len=1024)
    trace = rollout(env, [7] * 32)
    assert [step[2] for step in trace[1:]] == [False] * 31 + [True]
    assert "episode_summary" in trace[-1][4]
    assert np.array(trace[-1][4]["episode_summary"]["ranks"]).shape == (8, 4)


@pytest.mark.parametrize(
    "env_id", ["DRRL-Tiny-v0", "DRRL-Tiny-TopK-v0", "DRRL-Tiny-Budget-v0", "DRRL-Tiny-Live-v0"]
)
def test_both_env_checkers_pass(cache_root, env_id):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, cache_dir=cache_root, max_windows=2).unwrapped
    gym_check_env(env)
    sb3_check_env(env)


def test_observations_stay_in_bounds(tiny_env):
    rng = np.random.default_rng(0)
    for window in range(3):
        for step in rollout(tiny_env, rng.integers(0, 8, size=STEPS), window)[1:]:
            assert tiny_env.observation_space.contains(step[0])


def test_determinism_same_seed_same_actions(cache_root):
    first, second = (gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=4) for _ in "ab")
    actions = np.random.default_rng(1).integers(0, 8, size=STEPS)
    traces = []
    for env in (first, second):
        obs, info = env.reset(seed=7)
        trace = [(obs, info)]
        for action in actions:
            trace.append(env.step(action))
        traces.append(trace)
    for a, b in zip(*traces, strict=True):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y


def test_reward_is_the_documented_formula(tiny_env):
    env = tiny_env.unwrapped
    weights = env.config.weights
    for _, reward, _, _, info in rollout(tiny_env, [0, 3, 5, 7] * 4)[1:]:
        assert info["fidelity"] == info["raw_cosine"]  # the default fidelity term
        expected = (
            weights.alpha * info["fidelity"]
            - weights.beta * info["flops_ratio"]
            - weights.gamma * info["perturbation"]
        )
        assert reward == pytest.approx(expected, abs=1e-12)
        assert info["flops_ratio"] == pytest.approx(info["flops"] / info["flops_full"])
        assert info["reward"] == reward


def test_damage_units_and_reward_at_end_keep_the_ranking_of_schedules(cache_root, tiny_env):
    schedules = [[0, 3, 5, 7] * 4, [7] * 16, [0] * 16]
    paper = [rollout(tiny_env, actions) for actions in schedules]
    damage = gym.make(
        "DRRL-Tiny-v0", cache_dir=cache_root, max_windows=4, damage_scale=10.0, beta=0, gamma=0
    )
    end = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=4, reward_at_end=True)
    returns = []
    for actions, reference in zip(schedules, paper, strict=True):
        steps = rollout(damage, actions)[1:]
        for (_, reward, *_, info), (_, _, *_, before) in zip(steps, reference[1:], strict=True):
            assert reward == pytest.approx(-10.0 * (1 - before["fidelity"]), abs=1e-12)
            assert info["reward_fidelity"] == reward == info["step_reward"]
        returns.append(sum(step[1] for step in steps))
        ended = rollout(end, actions)[1:]
        assert [step[1] for step in ended[:-1]] == [0.0] * (STEPS - 1)
        paid = sum(step[1] for step in reference[1:])
        assert ended[-1][1] == pytest.approx(paid, abs=1e-9)
        assert [s[4]["step_reward"] for s in ended] == [s[1] for s in reference[1:]]
    fidelity = [sum(s[4]["fidelity"] for s in r[1:]) for r in paper]
    assert np.argsort(returns).tolist() == np.argsort(fidelity).tolist()
    assert max(returns) <= 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damage_scale": 0.0}, "damage_scale must be a number > 0"),
        ({"damage_scale": "10"}, "damage_scale must be a number > 0"),
        ({"damage_scale": float("nan")}, "damage_scale must be a number > 0"),
        ({"reward_at_end": 1}, "reward_at_end must be a bool"),
    ],
)
def test_bad_reward_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**{**TINY, **kwargs})


def test_a_toy_fidelity_term_is_one_object_plus_one_registration(cache_root, monkeypatch):
    from drrl_env import rewards
    from drrl_env.rewards import terms

    monkeypatch.setattr(terms, "FIDELITY_TERMS", dict(terms.FIDELITY_TERMS))
    monkeypatch.setattr(rewards, "FIDELITY_TERMS", terms.FIDELITY_TERMS)
    monkeypatch.setattr("drrl_env.envs.config.FIDELITY_TERMS", terms.FIDELITY_TERMS)
    squared = terms.RewardTerm(
        "cosine-squared", 0.0, 1.0, "the cosine squared", "cosine", lambda raw, steps: raw**2
    )
    rewards.register_fidelity_term(squared)
    env = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=4, fidelity="cosine-squared")
    weights = env.unwrapped.config.weights
    env.reset(options={"window": 1})
    for action in [0, 3, 5, 7] * 4:
        candidates = env.unwrapped.candidate_values()
        cosines = env.unwrapped.backend.candidates(*divmod(env.unwrapped.step_index, 4))
        np.testing.assert_allclose(candidates["fidelity"], np.asarray(cosines["cosine"]) ** 2)
        _, reward, _, _, info = env.step(action)
        assert info["fidelity"] == pytest.approx(info["raw_cosine"] ** 2, abs=1e-12)
        expected = (
            weights.alpha * info["raw_cosine"] ** 2
            - weights.beta * info["flops_ratio"]
            - weights.gamma * info["perturbation"]
        )
        assert reward == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_fidelity_term(squared)
    with pytest.raises(ValueError, match="raw measurements: cosine, dnll_taylor"):
        rewards.register_fidelity_term(terms.RewardTerm("kl", 0.0, 1.0, "?", "kl"))


def test_loss_fidelity_term_scales_the_estimated_loss_change(cache_root):
    env = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=4, fidelity="loss")
    for *_, info in rollout(env, [0, 3, 5, 7] * 4)[1:]:
        assert info["fidelity"] == pytest.approx(1 - STEPS * info["raw_dnll_taylor"])
        if info["rank"] == 64:
            assert info["fidelity"] == 1.0
    summary = info["episode_summary"]
    assert summary["mean_fidelity"] == pytest.approx(1 - summary["dnll_taylor_sum"])


def test_live_loss_term_computes_each_windows_gradient_once(cache_root, monkeypatch):
    from drrl_env.lm import measure

    calls = []
    original = measure.loss_gradient

    def counted(lm, tokens, *args, **kwargs):
        calls.append(len(tokens))
        return original(lm, tokens, *args, **kwargs)

    monkeypatch.setattr(measure, "loss_gradient", counted)
    live = DynamicRankEnv(
        **{**TINY, "max_windows": 2}, backend="live", cache_dir=cache_root, fidelity="loss"
    )
    actions = [0, 3, 5, 7] * 4
    first, again = rollout(live, actions, window=1), rollout(live, actions, window=1)
    assert len(calls) == 1  # the second episode on window 1 reuses the gradient
    assert [step[1] for step in first[1:]] == [step[1] for step in again[1:]]
    assert any(step[4]["raw_dnll_taylor"] != 0 for step in first[1:])  # the term is used
    rollout(live, actions, window=0)
    rollout(live, actions, window=1)
    assert len(calls) == 3  # only the last window's gradient is kept
    fresh = DynamicRankEnv(
        **{**TINY, "max_windows": 2}, backend="live", cache_dir=cache_root, fidelity="loss"
    )
    assert [step[1] for step in rollout(fresh, actions, window=1)[1:]] == [
        step[1] for step in first[1:]
    ]  # a kept gradient gives the rewards a computed one gives


def test_cached_and_live_agree_on_first_layer_of_first_segment(tiny_env, tiny_live):
    for action in (0, 2, 7):
        cached = rollout(tiny_env, [action], window=3)
        live = rollout(tiny_live, [action], window=3)
        np.testing.assert_allclose(cached[0], live[0], rtol=0, atol=1e-6)
        for key in ("flops", "flops_full", "rank"):
            assert cached[1][4][key] == live[1][4][key], key
        for key in ("fidelity", "perturbation", "reward"):
            assert cached[1][4][key] == pytest.approx(live[1][4][key], abs=1e-6), key


def test_live_episode_reports_perplexity_and_compounds_errors(tiny_live):
    from drrl_env.lm.runner import run_window

    env = tiny_live
    trace = rollout(env, [0] * STEPS, window=1)
    summary = trace[-1][4]["episode_summary"]
    backend = env.backend
    tokens = backend.tokens[1]
    result = run_window(env.problem.lm, tokens, 128, env.problem.method, np.array(summary["ranks"]))
    assert summary["perplexity"] == pytest.approx(result.perplexity, rel=1e-12)
    full = run_window(env.problem.lm, tokens, 128, "full")
    assert summary["perplexity_full"] == pytest.approx(full.perplexity, rel=1e-12)
    assert summary["perplexity"] != summary["perplexity_full"]


def test_masks_guardrail(tiny_env):
    env = tiny_env.unwrapped
    env.reset(options={"window": 0})
    saw_masked = False
    for _ in range(STEPS):
        mask = env.action_masks()
        assert mask.dtype == bool and mask.shape == (8,) and mask[-1]
        perturbations = env._perturbations
        np.testing.assert_array_equal(mask[:-1], perturbations[:-1] <= env.config.max_perturbation)
        blocked = np.flatnonzero(~mask)
        action = int(blocked[0]) if blocked.size else 0
        _, _, terminated, _, info = env.step(action)
        if blocked.size:
            saw_masked = True
            assert info["action_masked"] and info["requested_action"] == action
            assert info["rank"] > info["requested_rank"]
        if terminated:
            break
    assert saw_masked, "the tiny env should exercise the guardrail from full rank"


def test_greedy_policy_is_neither_full_rank_nor_static(tiny_env):
    env = tiny_env.unwrapped
    chosen, greedy_return = [], 0.0
    env.reset(options={"window": 0})
    for _ in range(STEPS):
        rewards = env.candidate_rewards()
        allowed = np.flatnonzero(env.action_masks())
        action = int(allowed[np.argmax(rewards[allowed])])
        _, reward, _, _, info = env.step(action)
        assert reward == pytest.approx(rewards[action])
        chosen.append(info["rank"])
        greedy_return += reward
    assert len(set(chosen)) > 1 and set(chosen) != {64}
    full_return = sum(step[1] for step in rollout(tiny_env, [7] * STEPS)[1:])
    assert greedy_return > full_return


def test_replay_reproduces_rewards_and_perplexity(tiny_live):
    trace = rollout(tiny_live, [7, 4, 2, 0] * 4, window=2)
    summary = trace[-1][4]["episode_summary"]
    actions = np.array(summary["actions"])
    assert len(set(actions.flatten())) > 1
    np.testing.assert_array_equal(actions_of(tiny_live, summary["ranks"]), actions)
    first = replay(tiny_live, 2, actions)
    assert first.rewards.tolist() == [step[1] for step in trace[1:]]
    again = validate(tiny_live, 2, actions, rewards=first.rewards, perplexity=first.perplexity)
    np.testing.assert_array_equal(again.rewards, first.rewards)
    with pytest.raises(ReplayMismatch, match="perplexity"):
        validate(tiny_live, 2, actions, perplexity=first.perplexity * 1.001)
    with pytest.raises(ReplayMismatch, match="reward"):
        validate(tiny_live, 2, actions, rewards=first.rewards + 1e-3)
    with pytest.raises(ValueError, match="shape"):
        replay(tiny_live, 2, actions[:2])
    with pytest.raises(ValueError, match="integers in 0..7"):
        replay(tiny_live, 2, np.full((4, 4), 8))
    assert live_env(EnvConfig(**TINY, cache_dir=None)).config.backend == "live"


# -- budgeted episodes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_env(cache_root):
    return gym.make("DRRL-Tiny-Budget-v0", cache_dir=cache_root, max_windows=2)


def test_budget_wall_keeps_every_episode_within_budget(budget_env):
    env = budget_env.unwrapped
    assert env.layout.budgeted and env.layout.size == 14 + 3 * 15  # (rank, keep) pairs
    rng = np.random.default_rng(0)
    for episode in range(6):
        env.reset(options={"window": episode % 2})
        replaced = 0
        for step in range(STEPS):
            mask = env.action_masks()
            assert mask.any()
            spent = env._spent
            costs = env.costs.executed[step // env.n_layers]
            future = env.wall.min_future[step + 1]
            np.testing.assert_array_equal(mask, spent + costs + future <= env.wall.cap * (1 + 1e-9))
            action = int(rng.integers(15)) if episode % 2 else 14  # exact attention, or random
            _, reward, terminated, _, info = env.step(action)
            assert info["action_masked"] == (not mask[action])
            if not mask[action]:
                replaced += 1
                assert mask[info["action"]] and info["requested_action"] == action
                assert costs[info["action"]] == costs[mask].max()  # the most expensive allowed
            assert reward == info["fidelity"]  # the budget replaces beta and gamma
            assert budget_env.observation_space.contains(env._observation)
        summary = info["episode_summary"]
        assert summary["flops_ratio"] <= 0.6 + 1e-9
        assert terminated and summary["masked_actions"] == replaced
        if episode % 2 == 0:  # asking for exact attention everywhere spends the budget
            assert summary["flops_ratio"] > 0.55 and replaced > 0


def test_budget_observation_shows_what_is_left(budget_env):
    env = budget_env.unwrapped
    observation, _ = env.reset(options={"window": 0})
    slices = env.layout.slices
    assert observation[slices["budget_left"]][0] == pytest.approx(0.6)
    assert observation[slices["steps_left"]][0] == 1.0
    assert observation[slices["budget_per_step"]][0] == pytest.approx(0.6)
    observation, *_ = env.step(0)
    spent = env._spent / env.episode_full_flops
    assert observation[slices["budget_left"]][0] == pytest.approx(0.6 - spent, abs=1e-6)
    assert observation[slices["steps_left"]][0] == pytest.approx(15 / 16)
    per_step = (0.6 - spent) * 16 / 15  # what is left, spread over the steps left
    assert observation[slices["budget_per_step"]][0] == pytest.approx(per_step, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.0}, r"budget must be a number in \(0, 1\]"),
        ({"budget": 1.5}, r"budget must be a number in \(0, 1\]"),
        ({"budget": 0.5, "beta": 0.3}, "leave beta unset"),
        ({"budget": 0.5, "gamma": 0.1}, "leave gamma unset"),
    ],
)
def test_bad_budget(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**{**TINY, "method": "topk", **kwargs})


def test_budget_below_the_cheapest_schedule_names_the_minimum(cache_root):
    with pytest.raises(ValueError, match=r"budget=0.05 is below .* the minimum is 0\.\d+"):
        gym.make("DRRL-Tiny-Budget-v0", cache_dir=cache_root, max_windows=2, budget=0.05)


def test_pair_grid_of_ranks_and_keeps(cache_root):
    env = gym.make(
        "DRRL-Tiny-TopK-v0",
        cache_dir=cache_root,
        max_windows=2,
        keeps=(0.25, 0.5),
        max_perturbation=1.0,
    ).unwrapped
    labels = env.actions.labels()
    assert labels[:3] == ["r8k0.25", "r8k0.5", "r16k0.25"] and labels[-1] == "r64"
    assert env.action_space.n == 7 * 2 + 1
    trace = rollout(env, [0, 1, 14, 2] * 4)
    assert {step[4]["keep"] for step in trace[1:]} == {0.25, 0.5, 1.0}
    assert trace[-1][4]["episode_summary"]["keeps"][0] == [0.25, 0.5, 1.0, 0.25]


# -- several environments, pickling ---------------------------------------------------------


def test_two_live_envs_in_one_process(cache_root):
    first, second = (
        gym.make("DRRL-Tiny-Live-v0", cache_dir=cache_root, max_windows=2) for _ in "ab"
    )
    alone = rollout(first, [3] * STEPS, window=1)[-1][4]["episode_summary"]
    first.reset(options={"window": 1})
    second.reset(options={"window": 0})
    for _ in range(STEPS):  # interleaved steps, one model
        _, _, _, _, info_first = first.step(3)
        second.step(5)
    summary = info_first["episode_summary"]
    assert summary["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-9)


def test_live_env_refuses_pickle_and_says_what_to_do(tiny_live):
    with pytest.raises(TypeError, match="cannot be pickled.*configuration"):
        pickle.dumps(tiny_live)


def test_cached_env_pickles(tiny_env):
    clone = pickle.loads(pickle.dumps(tiny_env.unwrapped))
    a, b = rollout(clone, [2] * 3, window=1), rollout(tiny_env, [2] * 3, window=1)
    np.testing.assert_array_equal(a[-1][0], b[-1][0])


# -- what a backend declares it can do ---------------------------------------------------


def test_backends_declare_their_capabilities(tiny_env, tiny_live):
    from drrl_env.envs.backends import Backend
    from drrl_env.envs.backends.cached import CachedBackend
    from drrl_env.envs.backends.live import LiveBackend

    assert {"teacher_forced", "bitwise_replay"} <= set(Backend.__annotations__)
    assert callable(Backend.rollout)
    cached, live = tiny_env.unwrapped, tiny_live
    assert isinstance(cached.backend, CachedBackend) and isinstance(live.backend, LiveBackend)
    assert cached.backend.teacher_forced is True and cached.backend.bitwise_replay is True
    assert live.backend.teacher_forced is False and live.backend.bitwise_replay is False
    for env in (cached, live):  # the env forwards what its backend declares
        assert env.teacher_forced is env.backend.teacher_forced
        assert env.bitwise_replay is env.backend.bitwise_replay
        assert env.n_windows == len(env.tokens) == 4
        assert env.tokens.shape == (4, env.config.seq_len)
        np.testing.assert_array_equal(env.tokens, env.backend.tokens)
    np.testing.assert_array_equal(cached.tokens, live.tokens)  # the same windows


def test_n_windows_counts_the_windows_reset_can_pin(tiny_env):
    env = tiny_env.unwrapped
    for window in range(env.n_windows):
        assert env.reset(options={"window": window})[1]["window"] == window
    with pytest.raises(ValueError, match=rf"0\.\.{env.n_windows - 1}"):
        env.reset(options={"window": env.n_windows})


def test_cached_rollout_reads_the_stored_arrays(tiny_env):
    env = tiny_env.unwrapped
    cache = env.backend.cache
    for name in ("cosine", "dnll_taylor", "spectra", "input_stats", "tokens", "mean_nll"):
        expected = np.stack([np.asarray(cache.shard(w)[name]) for w in range(4)])
        stacked = env.rollout(name)
        assert stacked.shape == expected.shape and stacked.dtype == expected.dtype
        np.testing.assert_array_equal(stacked, expected)
        np.testing.assert_array_equal(env.backend.rollout(name), expected)
        for window in range(4):
            np.testing.assert_array_equal(env.rollout(name, window), expected[window])
    assert env.rollout("cosine").shape == (4, 4, 4, 8)  # (W, S, L, A)
    np.testing.assert_array_equal(env.rollout("tokens"), env.tokens)


@pytest.mark.parametrize("window", [-1, 4, 1.0, True])
def test_cached_rollout_refuses_a_window_outside_the_env(tiny_env, window):
    with pytest.raises(ValueError, match=r"window=.* must be an int in 0\.\.3"):
        tiny_env.unwrapped.rollout("cosine", window)


def test_cached_rollout_names_the_arrays_it_holds(tiny_env):
    with pytest.raises(KeyError, match="no cached array 'cosin'.*'cosine'"):
        tiny_env.unwrapped.rollout("cosin")
    with pytest.raises(KeyError, match="no cached array 'flops'"):  # a static-cost method
        tiny_env.unwrapped.rollout("flops", 0)


def test_live_backend_stores_no_rollouts(tiny_live):
    for call in (lambda: tiny_live.rollout("cosine"), lambda: tiny_live.rollout("cosine", 0)):
        with pytest.raises(RuntimeError, match="live backend.*no rollouts.*backend='cached'"):
            call()
    with pytest.raises(RuntimeError, match="candidate measurements need backend='cached'"):
        tiny_live.backend.candidates(0, 0)


def test_reward_tolerance_follows_bitwise_replay(tiny_env, tiny_live):
    from drrl_env.replay import EXACT, REWARD_ATOL, REWARD_RTOL, reward_tolerance

    assert reward_tolerance(tiny_env.unwrapped.bitwise_replay) == (EXACT, EXACT)
    assert reward_tolerance(tiny_live.bitwise_replay) == (REWARD_RTOL, REWARD_ATOL)
    with pytest.raises(TypeError, match="bitwise_replay"):
        reward_tolerance("live")  # a backend's name is not what it can do


# -- bad input ---------------------------------------------------------------------------


def test_step_before_reset_and_after_end(cache_root):
    env = DynamicRankEnv(**{**TINY, "max_windows": 4}, cache_dir=cache_root)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    with pytest.raises(RuntimeError, match="before reset"):
        env.action_masks()
    rollout(env, [7] * STEPS)
    with pytest.raises(RuntimeError, match="ended"):
        env.step(0)


@pytest.mark.parametrize("action", [-1, 8, 2.5, "3"])
def test_action_outside_space(tiny_env, action):
    tiny_env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        tiny_env.unwrapped.step(action)


@pytest.mark.parametrize("options", [{"window": 10_000}, {"window": 1.0}, {"window": True}])
def test_window_option_out_of_range(tiny_env, options):
    with pytest.raises(ValueError, match="window"):
        tiny_env.reset(options=options)


def test_misspelt_reset_option_is_refused(tiny_env):
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['windw'\]"):
        tiny_env.reset(options={"windw": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ranks": (16, 8, 64)}, "increasing"),
        ({"ranks": (0, 64)}, "increasing"),
        ({"ranks": (8.7, 64)}, "integers"),
        ({"ranks": "8,64"}, "sequence of numbers"),
        ({"seq_len": 500}, "multiple"),
        ({"split": "test"}, "split"),
        ({"backend": "remote"}, "backend"),
        ({"method": "qr"}, "not registered; methods: full, gram"),
        ({"fidelity": "mse"}, "not a fidelity term; terms: cosine, loss, loss-fisher"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("inf")}, "beta must be a finite number"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"gamma": "0.1"}, "gamma"),
        ({"max_perturbation": 2.0}, "max_perturbation"),
        ({"max_windows": 2.5}, "max_windows must be an int"),
        ({"max_windows": 0}, "max_windows must be an int"),
        ({"keep": 0.5}, "sparse methods"),
        ({"method": "topk", "keep": 1.5}, r"keep must be a number in \(0, 1\]"),
        ({"method": "topk", "keep": 0.0}, r"keep must be a number in \(0, 1\]"),
        ({"method": "topk", "keeps": (0.5, 0.25)}, "increasing"),
        ({"device": "cuda"}, "CUDA is not available"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**{**TINY, **kwargs})


def test_ranks_beyond_head_dim(cache_root):
    with pytest.raises(ValueError, match="ranks"):
        DynamicRankEnv(**{**TINY, "ranks": (8, 80)}, cache_dir=cache_root)


def test_too_short_corpus(tmp_path):
    short = tmp_path / "wiki.test.raw"
    short.write_text(" = A = \n Short text . \n = B = \n Also short . \n")
    with pytest.raises(ValueError, match="seq_len|window needs"):
        DynamicRankEnv(**TINY, data_path=str(short), cache_dir=str(tmp_path / "c"))


def test_a_plain_text_corpus_works(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = [f"Sentence number {i} talks about a topic of its own, briefly." for i in range(400)]
    corpus.write_text("\n".join(lines))
    env = gym.make("DRRL-Tiny-v0", data_path=str(corpus), cache_dir=str(tmp_path / "c"))
    assert env.unwrapped.n_windows >= 2
    rollout(env, [3] * STEPS)


@pytest.mark.slow
def test_smollm2_env_passes_checkers(tmp_path):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    # the real model (30 layers, head dim 64) on one short window: a cheap cache to build
    short = {"seq_len": 256, "segment_length": 64, "max_windows": 1}
    env = gym.make("DRRL-Wikitext-v0", cache_dir=str(tmp_path), **short).unwrapped
    gym_check_env(env)
    sb3_check_env(env)
    assert env.n_layers == 30 and env.ranks[-1] == 64


# -- the cache: keyed, resumable, extended, checked ------------------------------------------


def test_cache_of_more_windows_serves_fewer_and_extends(tmp_path, monkeypatch):
    config = EnvConfig(**{**TINY, "max_windows": 3}, cache_dir=str(tmp_path))
    three = DynamicRankEnv(config)
    built = []
    original = RolloutCache.build

    def spy(self, *args, **kwargs):
        built.append(list(self.missing() or []))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RolloutCache, "build", spy)
    two = DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 2}, cache_dir=str(tmp_path)))
    assert two.backend.n_windows == 2 and built == []
    np.testing.assert_array_equal(two.backend.tokens, three.backend.tokens[:2])
    five = DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 5}, cache_dir=str(tmp_path)))
    assert five.backend.n_windows == 5 and built == [[3, 4]]  # only the new windows


def test_interrupted_build_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import drrl_env.envs.backends.cached as cached

    original = cached.window_builder
    calls = []

    def failing_builder(config, threads=None):
        build = original(config, threads)

        def build_window(window):
            calls.append(window)
            if window == 2 and calls.count(2) == 1:
                raise KeyboardInterrupt
            return build(window)

        return build_window

    monkeypatch.setattr(cached, "window_builder", failing_builder)
    config = EnvConfig(**{**TINY, "max_windows": 4}, cache_dir=str(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        DynamicRankEnv(config)
    assert RolloutCache(config).missing() == [2, 3]  # windows 0 and 1 were kept
    resumed = DynamicRankEnv(config)
    assert calls == [0, 1, 2, 2, 3]
    monkeypatch.setattr(cached, "window_builder", original)
    clean = DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 4}, cache_dir=str(tmp_path / "b")))
    for window in range(4):
        a = resumed.backend.cache.store.read_shard(window)
        b = clean.backend.cache.store.read_shard(window)
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_read_only_cache_folder_fails_before_building(tmp_path, monkeypatch):
    from drrl_env.store import ShardStore, StoreNotWritableError

    def not_writable(self):
        raise StoreNotWritableError(f"cache folder {self.folder} is not writable")

    monkeypatch.setattr(ShardStore, "check_writable", not_writable)
    import drrl_env.envs.problem as problem

    monkeypatch.setattr(problem, "shared_model", lambda *a: pytest.fail("built before checking"))
    with pytest.raises(StoreNotWritableError, match="not writable"):
        DynamicRankEnv(EnvConfig(**{**TINY, "max_windows": 2}, cache_dir=str(tmp_path)))


def test_non_finite_cached_features_are_rebuilt(tmp_path):
    from drrl_env.store import CorruptShardWarning

    config = EnvConfig(**{**TINY, "max_windows": 2}, cache_dir=str(tmp_path))
    env = DynamicRankEnv(config)
    shard = env.backend.cache.store._shard_path(1) / "input_stats.npy"
    stats = np.load(shard)
    stats[0, 0, 1] = np.nan
    np.save(shard, stats)
    with pytest.warns(CorruptShardWarning, match="window 1 .* array 'input_stats' fails its"):
        fresh = DynamicRankEnv(config)
    fresh.reset(options={"window": 1})
    assert np.isfinite(fresh.backend.cache.shard(1)["input_stats"]).all()
    np.testing.assert_array_equal(fresh.backend.table(1).raw, env.backend.table(1).raw)


def tiny_model_folder(folder, seed: int) -> str:
    """A small GPT-2 saved with save_pretrained, with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from drrl_env.lm.models import tiny_config

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level, decoders.ByteLevel()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-gpt2"))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return str(folder)


def test_new_weights_in_a_model_folder_are_never_served_stale(tmp_path):
    folder = tiny_model_folder(tmp_path / "model", seed=1)
    kwargs = {
        "model": folder,
        "seq_len": 256,
        "segment_length": 128,
        "method": "gram",
        "max_windows": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    before = DynamicRankEnv(**kwargs)
    rewards_before = [step[1] for step in rollout(before, [0] * 4)[1:]]
    tiny_model_folder(tmp_path / "model", seed=2)  # other weights, same folder
    from drrl_env.lm.facts import shared_model

    shared_model.cache_clear()
    after = DynamicRankEnv(**kwargs)
    assert after.backend.cache.store.folder != before.backend.cache.store.folder
    rewards_after = [step[1] for step in rollout(after, [0] * 4)[1:]]
    assert rewards_after != rewards_before

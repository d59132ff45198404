"""Input-dependent costs on the tiny model: ``topp`` envs, realised FLOPs, budgets, KL."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import drrl_env
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.methods.base import Setting

TINY_TOPP = drrl_env.ENV_IDS["DRRL-Tiny-TopP-v0"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("drrl-topp-cache"))


@pytest.fixture(scope="module")
def topp_env(cache_root):
    # No guardrail: every requested action runs (the guardrail is tested elsewhere).
    return gym.make("DRRL-Tiny-TopP-v0", cache_dir=cache_root, max_windows=2, max_perturbation=1)


@pytest.fixture(scope="module")
def topp_live(cache_root):
    kwargs = {**TINY_TOPP, "max_windows": 2, "max_perturbation": 1}
    return DynamicRankEnv(**kwargs, backend="live", cache_dir=cache_root)


@pytest.fixture(scope="module")
def topp_budget(cache_root):
    return gym.make("DRRL-Tiny-TopP-Budget-v0", cache_dir=cache_root, max_windows=2)


def play(env, actions, window=0):
    env.reset(options={"window": window})
    infos = []
    for action in actions:
        *_, info = env.step(action)
        assert not info["action_masked"]
        infos.append(info)
    return infos


def test_grid_has_mass_targets_selection_at_full_rank_and_the_floor(topp_env):
    actions = topp_env.unwrapped.actions
    head_dim = actions.head_dim
    assert Setting(8, 0.0) in actions.settings  # the static-cost floor
    assert Setting(head_dim, 0.9) in actions.settings  # exact-score selection (upper bound)
    assert actions.settings[-1] == Setting(head_dim)  # exact attention, last
    assert len(set(actions.settings)) == len(actions.settings)


def test_realised_costs_depend_on_the_input(topp_env):
    env = topp_env.unwrapped
    action = env.actions.index(Setting(16, 0.9))
    flops = [[info["flops"] for info in play(env, [action] * env.steps, w)] for w in (0, 1)]
    kept = [[info["kept_fraction"] for info in play(env, [action] * env.steps, w)] for w in (0, 1)]
    assert flops[0] != flops[1]  # the same action costs what the window needs
    assert len(set(flops[0])) > env.n_segments  # and differs between layers of one window
    bound = env.costs.executed[np.repeat(np.arange(env.n_segments), env.n_layers), action]
    assert np.all(np.array(flops) <= bound + 1e-6)  # never above the upper bound
    assert all(0 < k < 1 for k in kept[0])


def test_cached_realised_costs_equal_the_live_ones_on_the_first_call(topp_env, topp_live):
    env, live = topp_env.unwrapped, topp_live
    for setting in (Setting(16, 0.9), Setting(8, 0.0), Setting(64, 0.99)):
        action = env.actions.index(setting)
        cached, direct = play(env, [action], 1)[0], play(live, [action], 1)[0]
        assert cached["flops"] == pytest.approx(direct["flops"], rel=1e-12)
        assert cached["kept_fraction"] == pytest.approx(direct["kept_fraction"], rel=1e-12)
        assert cached["fidelity"] == pytest.approx(direct["fidelity"], abs=1e-6)


def test_candidate_values_report_what_each_action_realises(topp_env):
    env = topp_env.unwrapped
    env.reset(options={"window": 0})
    values = env.candidate_values()
    for action in (0, 3, len(env.actions) - 1):
        env.reset(options={"window": 0})
        _, _, _, _, info = env.step(action)
        assert values["flops_ratio"][action] == pytest.approx(info["flops_ratio"], rel=1e-12)
        assert values["reward"][action] == pytest.approx(info["reward"], rel=1e-9)


def test_observation_carries_the_previous_segment_cost(topp_env):
    env = topp_env.unwrapped
    slices = env.layout.slices
    assert {"kept_prev_layer", "cost_prev_layer"} <= set(slices)
    action = env.actions.index(Setting(16, 0.8))
    observation, _ = env.reset(options={"window": 0})
    assert observation[slices["kept_prev_layer"]][0] == 1.0  # every layer starts exact
    infos = []
    for _ in range(env.n_layers):  # the whole first segment
        observation, *_, info = env.step(action)
        infos.append(info)
    assert observation[slices["kept_prev_layer"]][0] == pytest.approx(infos[0]["kept_fraction"])
    assert observation[slices["cost_prev_layer"]][0] == pytest.approx(infos[0]["flops_ratio"])


@pytest.mark.parametrize("env_id", ["DRRL-Tiny-TopP-v0", "DRRL-Tiny-TopP-Budget-v0"])
def test_both_env_checkers_pass(cache_root, env_id):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, cache_dir=cache_root, max_windows=2)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=False)


def test_budget_holds_for_1000_random_episodes(topp_budget):
    env = topp_budget.unwrapped
    cap = env.config.budget
    rng = np.random.default_rng(0)
    forced = 0
    floor = env.actions.index(Setting(8, 0.0))
    for episode in range(1000):
        env.reset(seed=episode)
        masked_policy = episode % 2 == 0  # half sample among allowed actions, half blindly
        for _ in range(env.steps):
            mask = env.action_masks()
            assert mask.any()
            allowed = np.flatnonzero(mask)
            if len(allowed) == 1:
                forced += 1
            action = int(rng.choice(allowed)) if masked_policy else int(rng.integers(mask.size))
            *_, terminated, _, info = env.step(action)
        assert terminated
        summary = info["episode_summary"]
        assert summary["flops_ratio"] <= cap * (1 + 1e-9), (episode, summary["flops_ratio"])
    assert forced > 0  # the wall had to force the cheapest setting at times
    assert env.costs.executed[:, floor].min() == env.costs.executed.min()


def test_budget_forces_the_floor_when_only_it_fits(topp_budget):
    env = topp_budget.unwrapped
    env.reset(options={"window": 0})
    most = int(np.argmax(env.costs.executed[0]))
    while env.step_index < env.steps:
        mask = env.action_masks()
        *_, info = env.step(most)
        if not mask[most]:
            assert info["action_masked"] and mask[info["action"]]
    assert info["episode_summary"]["flops_ratio"] <= env.config.budget * (1 + 1e-9)


def test_budget_floor_is_checked_before_any_rollout_is_built(tmp_path):
    import time

    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"budget=0.01 is below .* the minimum is"):
        gym.make("DRRL-Tiny-Budget-v0", cache_dir=str(tmp_path), max_windows=2, budget=0.01)
    assert time.perf_counter() - started < 60
    shards = [p for p in tmp_path.rglob("*") if p.is_dir() and p.parent.name == "shards"]
    assert shards == []  # no window was built


def test_live_episode_reports_token_kl_and_top1(topp_live):
    env = topp_live
    exact = play(env, [len(env.actions) - 1] * env.steps, 0)[-1]["episode_summary"]
    assert exact["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert exact["top1_agreement"] == 1.0
    floor = env.actions.index(Setting(8, 0.0))
    cheap = play(env, [floor] * env.steps, 0)[-1]["episode_summary"]
    assert cheap["mean_kl"] > 1e-4
    assert 0 <= cheap["top1_agreement"] <= 1
    assert cheap["flops_ratio"] < exact["flops_ratio"]


@pytest.mark.parametrize("action", [True, np.bool_(False)])
def test_bool_actions_are_refused(topp_env, action):
    topp_env.reset(options={"window": 0})
    with pytest.raises(ValueError, match="int index"):
        topp_env.unwrapped.step(action)


@pytest.mark.parametrize("options", ["window", ["window", 0], 3])
def test_reset_options_must_be_a_dict(topp_env, options):
    with pytest.raises(ValueError, match="must be a dict"):
        topp_env.unwrapped.reset(options=options)

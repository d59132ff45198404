"""The agent factory: every algorithm x policy trains, saves, reloads and predicts identically."""

from __future__ import annotations

import inspect
from dataclasses import fields

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

import drrl_env
from agents import (
    ALGOS,
    POLICIES,
    RankMetricsCallback,
    StateTokenExtractor,
    default_hyperparams,
    load_agent,
    make_agent,
    save_agent,
)
from agents.hyperparams import ALGO_PARAMS
from drrl_env.envs.dynamic_rank import DynamicRankEnv

TINY = {**drrl_env.ENV_IDS["DRRL-Tiny-v0"][0], "max_windows": 2}
SHORT = {
    "ppo": {"n_steps": 64, "batch_size": 32, "n_epochs": 2},
    "maskable_ppo": {"n_steps": 64, "batch_size": 32, "n_epochs": 2},
    "a2c": {"n_steps": 16},
    "dqn": {"learning_starts": 64, "target_update_interval": 64},
}
TRAIN_STEPS = 256


def observations_and_masks(env, episodes=2, seed=0):
    """Observations (and their masks) of random-action episodes on every window."""
    rng = np.random.default_rng(seed)
    observations, masks = [], []
    for episode in range(episodes):
        observation, _ = env.reset(options={"window": episode % 2})
        done = False
        while not done:
            observations.append(observation)
            masks.append(env.unwrapped.action_masks())
            observation, _, terminated, truncated, _ = env.step(int(rng.integers(8)))
            done = terminated or truncated
    return np.stack(observations), np.stack(masks)


def deterministic_actions(model, observations, masks):
    if "maskable" in type(model).__name__.lower():
        return model.predict(observations, deterministic=True, action_masks=masks)[0]
    return model.predict(observations, deterministic=True)[0]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_algo_and_policy_trains_saves_and_reloads(env, tmp_path, algo, policy):
    model = make_agent(algo, env, policy, seed=0, **SHORT[algo])
    callback = RankMetricsCallback()
    model.learn(TRAIN_STEPS, callback=callback)
    assert model.num_timesteps >= TRAIN_STEPS
    assert len(callback.episodes) >= TRAIN_STEPS // 16 - 1
    extractor = model.policy.features_extractor if algo != "dqn" else model.q_net.features_extractor
    assert isinstance(extractor, StateTokenExtractor) == (policy == "transformer")

    path = save_agent(model, tmp_path / f"{algo}-{policy}")
    again = load_agent(path, env=env)
    assert type(again) is type(model) and again.drrl_algo == algo and again.drrl_policy == policy
    for name, tensor in model.policy.state_dict().items():
        torch.testing.assert_close(again.policy.state_dict()[name], tensor, rtol=0, atol=0)
    observations, masks = observations_and_masks(env)
    np.testing.assert_array_equal(
        deterministic_actions(again, observations, masks),
        deterministic_actions(model, observations, masks),
    )
    for observation, mask in zip(observations[:8], masks[:8], strict=True):
        assert deterministic_actions(again, observation, mask) == deterministic_actions(
            model, observation, mask
        )


def test_maskable_ppo_never_picks_a_masked_action(env):
    model = make_agent("maskable_ppo", env, "mlp", seed=1, **SHORT["maskable_ppo"])
    callback = RankMetricsCallback()
    model.learn(TRAIN_STEPS, callback=callback)
    assert callback.history and all(m["env/masked_rate"] == 0.0 for m in callback.history)
    assert sum(summary["masked_actions"] for summary in callback.episodes) == 0
    observations, masks = observations_and_masks(env, episodes=4, seed=2)
    assert not masks.all(), "the check needs states where the guardrail masks something"
    for stochastic in (False, True):
        actions = model.predict(observations, deterministic=not stochastic, action_masks=masks)[0]
        assert masks[np.arange(len(actions)), actions].all()


def test_defaults_live_in_dataclasses_the_constructors_accept():
    for algo, cls in ALGOS.items():
        accepted = set(inspect.signature(cls.__init__).parameters)
        params = default_hyperparams(algo)
        assert {f.name for f in fields(params)} <= accepted, algo
        assert type(params) is ALGO_PARAMS[algo]
    with pytest.raises(ValueError, match="ppo"):
        default_hyperparams("sac")


def test_hyperparameter_overrides_and_policy_kwargs(env, tmp_path):
    model = make_agent(
        "ppo",
        env,
        "transformer",
        n_steps=32,
        batch_size=16,
        target_kl=0.05,
        policy_kwargs={"features_extractor_kwargs": {"d_model": 16, "n_heads": 2}},
        tensorboard_log=tmp_path,
    )
    assert (model.n_steps, model.target_kl, model.batch_size) == (32, 0.05, 16)
    assert model.tensorboard_log == str(tmp_path)
    extractor = model.policy.features_extractor
    assert extractor.rank_proj.out_features == 16 and extractor.features_dim == 64
    np.testing.assert_allclose(
        extractor.fractions.flatten().numpy(), np.array(env.unwrapped.ranks) / 64
    )


# -- bad input ---------------------------------------------------------------------------


def test_unknown_algorithm_or_policy_lists_the_valid_names(env):
    with pytest.raises(ValueError, match="sac.*ppo, a2c, dqn, maskable_ppo"):
        make_agent("sac", env)
    with pytest.raises(ValueError, match="cnn.*mlp, transformer"):
        make_agent("ppo", env, policy="cnn")
    with pytest.raises(ValueError, match="unknown hyperparameter.*n_stepz"):
        make_agent("ppo", env, n_stepz=3)


def test_algorithms_and_policies_refuse_envs_they_cannot_handle():
    with pytest.raises(ValueError, match="dqn needs a Discrete action space.*Box"):
        make_agent("dqn", gym.make("Pendulum-v1"))
    with pytest.raises(ValueError, match="action_masks"):
        make_agent("maskable_ppo", gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="observation size 4 is not a dynamic-rank"):
        make_agent("ppo", gym.make("CartPole-v1"), policy="transformer")


def test_loading_into_an_env_of_another_observation_size(env, cache_root, tmp_path):
    path = save_agent(make_agent("ppo", env, "transformer"), tmp_path / "ppo")
    four_ranks = DynamicRankEnv(
        **TINY, ranks=(16, 32, 48, 64), backend="live", cache_dir=cache_root
    )
    assert four_ranks.observation_space.shape == (19,)
    with pytest.raises(
        ValueError, match=r"incompatible observation sizes.*\(27,\) \(8 candidate ranks\).*4 cand"
    ):
        load_agent(path, env=four_ranks)
    with pytest.raises(ValueError, match="holds a ppo agent, not dqn"):
        load_agent(path, algo="dqn")


def test_loading_a_plain_sb3_file_needs_the_algorithm(env, tmp_path):
    PPO("MlpPolicy", env, n_steps=16, batch_size=16).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="pass algo="):
        load_agent(tmp_path / "plain.zip")
    assert isinstance(load_agent(tmp_path / "plain", algo="ppo", env=env), PPO)

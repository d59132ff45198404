"""The agent factory: every algorithm x policy trains, saves, reloads and predicts identically."""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import fields

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import DummyVecEnv

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
from agents.factory import (
    SIGNATURE_ATTRIBUTE,
    check_signature_match,
    env_signature,
    signature_differences,
)
from agents.hyperparams import ALGO_PARAMS
from drrl_env.envs.dynamic_rank import DynamicRankEnv

TINY = {**drrl_env.ENV_IDS["DRRL-Tiny-v0"], "max_windows": 2}
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
@pytest.mark.parametrize("algo", [a for a in ALGOS if a not in ("bc", "dagger", "lagrangian_ppo")])
def test_every_algo_and_policy_trains_saves_and_reloads(env, tmp_path, algo, policy):
    # bc and dagger imitate a budgeted expert, lagrangian_ppo prices a soft budget: their
    # tests (test_planning.py, test_agents_lagrangian.py) train, save and reload them.
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
        accepted = set()
        for klass in cls.__mro__:  # an __init__ taking **kwargs hands them to its parent's
            parameters = inspect.signature(klass.__init__).parameters
            accepted |= set(parameters)
            if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                break
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
    (eight,), (four,) = env.observation_space.shape, four_ranks.observation_space.shape
    assert four < eight
    with pytest.raises(ValueError, match=r"actions: the agent has 8 actions, the env 4") as info:
        load_agent(path, env=four_ranks)
    assert re.search(r"^\s*observation: \d+ of \d+ differ", str(info.value), re.MULTILINE)
    assert not re.search(r"^\s*(model|method):", str(info.value), re.MULTILINE)
    with pytest.raises(ValueError, match="holds a ppo agent, not dqn"):
        load_agent(path, algo="dqn")

    PPO("MlpPolicy", env, n_steps=16, batch_size=16).save(tmp_path / "plain")
    with (
        pytest.warns(UserWarning, match="without an env signature"),
        pytest.raises(
            ValueError,
            match=rf"incompatible observation sizes.*\({eight},\) \(8 candidate ranks\)"
            rf".*\({four},\) \(4 cand",
        ),
    ):
        load_agent(tmp_path / "plain", algo="ppo", env=four_ranks)


def test_loading_a_plain_sb3_file_needs_the_algorithm(env, tmp_path):
    PPO("MlpPolicy", env, n_steps=16, batch_size=16).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="pass algo="):
        load_agent(tmp_path / "plain.zip")
    with pytest.warns(UserWarning, match=r"plain\.zip was saved without an env signature"):
        again = load_agent(tmp_path / "plain", algo="ppo", env=env)
    assert isinstance(again, PPO)


# -- env signature: an action index must mean the same rank after loading ----------------


@pytest.fixture(scope="module")
def saved_ppo(env, tmp_path_factory):
    """A PPO agent made and saved on the default grid of DRRL-Tiny-v0 (8, 16, ..., 64)."""
    model = make_agent("ppo", env, seed=0, **SHORT["ppo"])
    return save_agent(model, tmp_path_factory.mktemp("signature") / "ppo")


def test_save_agent_stores_the_training_env_signature_in_the_zip(env, saved_ppo, tmp_path):
    data, _, _ = load_from_zip_file(saved_ppo)
    assert data[SIGNATURE_ATTRIBUTE] == env.unwrapped.signature()
    assert data[SIGNATURE_ATTRIBUTE]["actions"][3][0] == 32  # [rank, keep] of action 3

    again = load_agent(saved_ppo)  # no env: the signature travels with the model
    resaved, _, _ = load_from_zip_file(save_agent(again, tmp_path / "resaved"))
    assert resaved[SIGNATURE_ATTRIBUTE] == env.unwrapped.signature()


def test_an_env_whose_actions_mean_other_ranks_is_refused(env, saved_ppo, cache_root):
    other = gym.make("DRRL-Tiny-Live-v0", ranks=[1, 2, 3, 4, 5, 6, 7, 64], cache_dir=cache_root)
    # The spaces agree, so only the signature can tell that action 3 means rank 4, not 32.
    assert other.observation_space == env.observation_space
    assert other.action_space == env.action_space
    with pytest.raises(ValueError, match="actions: 7 of 8 differ") as info:
        load_agent(saved_ppo, env=other)
    message = str(info.value)
    assert str(saved_ppo) in message
    saved, current = env.unwrapped.signature()["actions"], other.unwrapped.signature()["actions"]
    assert (saved[3][0], current[3][0]) == (32, 4)
    assert f"action 3: {saved[3]!r} vs {current[3]!r}" in message
    assert "action 7" not in message, "the full-rank action is the same in both grids"
    assert not re.search(r"^\s*(model|method|observation):", message, re.MULTILINE)


def test_an_env_with_the_same_grid_loads_without_warning(env, saved_ppo, cache_root):
    same = gym.make("DRRL-Tiny-Live-v0", cache_dir=cache_root)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*env signature")
        again = load_agent(saved_ppo, env=same)
    assert getattr(again, SIGNATURE_ATTRIBUTE) == same.unwrapped.signature()


def test_an_env_with_another_method_is_refused(saved_ppo, cache_root):
    svd = gym.make("DRRL-Tiny-v0", method="svd", max_windows=2, cache_dir=cache_root)
    with pytest.raises(ValueError, match="method: the agent's 'calibrated', the env's 'svd'"):
        load_agent(saved_ppo, env=svd)


def test_a_missing_file_names_the_resolved_zip_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = re.escape(str(tmp_path.resolve() / "runs" / "agent.zip"))
    with pytest.raises(FileNotFoundError, match=expected):
        load_agent("runs/agent")
    with pytest.raises(FileNotFoundError, match=expected):
        load_agent("runs/agent.zip")


def test_signature_of_a_vec_env_and_of_an_env_without_one(env):
    assert env_signature(DummyVecEnv([lambda: env])) == env.unwrapped.signature()
    cartpole = gym.make("CartPole-v1")
    assert env_signature(cartpole) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_signature_match(None, cartpole)  # nothing to compare, nothing to warn about
    with pytest.raises(ValueError, match="model='tiny-llama'.*has no signature"):
        check_signature_match(env.unwrapped.signature(), cartpole)


def test_signature_differences_compare_every_key():
    saved = {"model": "m", "actions": [[8, 1.0], [16, 1.0]], "budget": 0.5}
    current = {"model": "m", "actions": [[8, 1.0], [16, 0.5]], "reward": "fidelity"}
    assert signature_differences(saved, current) == [
        "actions: 1 of 2 differ (agent vs env) - action 1: [16, 1.0] vs [16, 0.5]",
        "budget: the agent's 0.5, missing from the env's",
        "reward: missing from the agent's, the env's 'fidelity'",
    ]
    assert signature_differences(saved, dict(saved)) == []


def test_budgeted_envs_get_the_sequential_discount(tmp_path):
    from stable_baselines3.common.env_util import make_vec_env

    from agents.hyperparams import BUDGET_DISCOUNT, DISCOUNT

    budget = gym.make("DRRL-Tiny-Budget-v0", cache_dir=str(tmp_path), max_windows=1)
    plain = gym.make("DRRL-Tiny-TopK-v0", cache_dir=str(tmp_path), max_windows=1)
    assert make_agent("ppo", budget).gamma == BUDGET_DISCOUNT == 0.99
    assert make_agent("dqn", plain).gamma == DISCOUNT == 0.5
    vector = make_vec_env(
        "DRRL-Tiny-Budget-v0", n_envs=1, env_kwargs={"cache_dir": str(tmp_path), "max_windows": 1}
    )
    assert make_agent("maskable_ppo", vector).gamma == BUDGET_DISCOUNT
    assert make_agent("ppo", budget, gamma=0.9).gamma == 0.9  # an override still wins


@pytest.mark.parametrize("verbose", [0, 1])
def test_learning_without_tensorboard_writes_no_log_folder(env, tmp_path, monkeypatch, verbose):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = make_agent("ppo", env, seed=0, verbose=verbose, **SHORT["ppo"])
    model.learn(64)
    path = save_agent(model, tmp_path / "saved" / "agent")
    load_agent(path, env=env).learn(64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_verbose_learning_without_tensorboard_still_prints(env, capsys):
    make_agent("ppo", env, seed=0, verbose=1, **SHORT["ppo"]).learn(64)
    assert "total_timesteps" in capsys.readouterr().out


def test_learning_with_tensorboard_writes_event_files(env, tmp_path):
    make_agent("a2c", env, seed=0, tensorboard_log=tmp_path, **SHORT["a2c"]).learn(32)
    assert list(tmp_path.glob("*/events.out.tfevents.*"))

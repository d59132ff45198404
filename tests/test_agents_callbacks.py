"""Callbacks: rank metrics reach TensorBoard; checkpoints and early stopping come from SB3."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.callbacks import CallbackList, EvalCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import (
    RankMetricsCallback,
    checkpoint_callback,
    early_stopping_callback,
    make_agent,
    training_callbacks,
)


class InfoRecorder(gym.Wrapper):
    """Keeps every step info, to check the callback's averages independently."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.infos: list[dict] = []

    def step(self, action):
        result = self.env.step(action)
        self.infos.append(result[4])
        return result


class PinnedWindow(gym.Wrapper):
    """Every episode reads the same window (a deterministic evaluation env)."""

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed, options={"window": 0})


def scalars(log_dir: Path) -> dict[str, list[float]]:
    (run,) = [path.parent for path in log_dir.rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return {
        tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_rank_metrics_are_rollout_means_in_tensorboard(cache_root, tmp_path):
    env = InfoRecorder(gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2))
    model = make_agent(
        "ppo", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, tensorboard_log=tmp_path
    )
    callback = RankMetricsCallback()
    model.learn(128, callback=callback, tb_log_name="ppo")
    infos = env.infos
    assert len(callback.history) == 2 and len(infos) == 128
    for rollout, steps in zip(callback.history, (infos[:64], infos[64:]), strict=True):
        assert rollout["env/fidelity"] == pytest.approx(np.mean([i["fidelity"] for i in steps]))
        assert rollout["env/flops_ratio"] == pytest.approx(
            np.mean([i["flops_ratio"] for i in steps])
        )
        assert rollout["env/perturbation"] == pytest.approx(
            np.mean([i["perturbation"] for i in steps])
        )
        assert rollout["env/masked_rate"] == pytest.approx(
            np.mean([i["action_masked"] for i in steps])
        )
        for layer in range(4):
            ranks = [i["rank"] for i in steps if i["layer"] == layer]
            assert rollout[f"env/rank_layer_{layer}"] == pytest.approx(np.mean(ranks))
    assert len(callback.episodes) == 8
    logged = scalars(tmp_path)
    expected = {
        "env/fidelity",
        "env/flops_ratio",
        "env/perturbation",
        "env/masked_rate",
        "env/episode_flops_reduction",
        "env/episode_mean_fidelity",
        *(f"env/rank_layer_{i}" for i in range(4)),
    }
    assert expected <= set(logged)
    assert logged["env/fidelity"] == pytest.approx([h["env/fidelity"] for h in callback.history])


def test_early_stopping_and_checkpoints(cache_root, tmp_path):
    env = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2)
    eval_env = PinnedWindow(gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2))
    # learning_rate 0: every evaluation scores the same, so none improves on the first
    model = make_agent("maskable_ppo", env, n_steps=64, batch_size=32, learning_rate=0.0)
    stopper = early_stopping_callback(
        eval_env, "maskable_ppo", tmp_path, eval_freq=32, n_eval_episodes=1, patience=1, min_evals=1
    )
    checkpoints = checkpoint_callback(tmp_path / "checkpoints", save_freq=32, name_prefix="mppo")
    model.learn(2_000, callback=CallbackList([RankMetricsCallback(), checkpoints, stopper]))
    assert model.num_timesteps == 96  # evaluations at 32, 64 and 96: stops after the third
    assert len(stopper.evaluations_results) == 3
    assert (tmp_path / "best_model.zip").is_file()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["mppo_32_steps.zip", "mppo_64_steps.zip", "mppo_96_steps.zip"]


def test_training_callbacks_bundle(cache_root, tmp_path):
    eval_env = gym.make("DRRL-Tiny-v0", cache_dir=cache_root, max_windows=2)
    bundle = training_callbacks("dqn", tmp_path, eval_env, checkpoint_freq=100, eval_freq=50)
    kinds = [type(c).__name__ for c in bundle.callbacks]
    assert kinds == ["RankMetricsCallback", "CheckpointCallback", "EvalCallback"]
    masked = training_callbacks("maskable_ppo", tmp_path, eval_env).callbacks[-1]
    assert type(masked).__name__ == "MaskableEvalCallback" and isinstance(masked, EvalCallback)
    assert len(training_callbacks("ppo", tmp_path).callbacks) == 2

"""drrl-gym: dynamic-rank attention of a frozen language model as a Gymnasium benchmark.

Importing this package registers the environment ids (it imports neither torch nor any
model weights)::

    import gymnasium as gym
    import drrl_env

    env = gym.make("DRRL-Wikitext-v0")

or, without importing first, ``gym.make("drrl_env:DRRL-Wikitext-v0")``.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENTRY_POINT = "drrl_env.envs.dynamic_rank:DynamicRankEnv"

# id -> (kwargs, episode length of those kwargs: segments * layers)
ENV_IDS: dict[str, tuple[dict, int]] = {
    "DRRL-Wikitext-v0": ({"backend": "cached"}, 4 * 30),
    "DRRL-Wikitext-Live-v0": ({"backend": "live"}, 4 * 30),
    "DRRL-Wikitext-SVD-v0": ({"backend": "cached", "method": "svd"}, 4 * 30),
    "DRRL-Tiny-v0": (
        {
            "model": "tiny-llama",
            "seq_len": 512,
            "segment_length": 128,
            "max_windows": 16,
            "method": "calibrated",
        },
        4 * 4,
    ),
    "DRRL-Tiny-Live-v0": (
        {
            "model": "tiny-llama",
            "seq_len": 512,
            "segment_length": 128,
            "max_windows": 16,
            "method": "calibrated",
            "backend": "live",
        },
        4 * 4,
    ),
}

for _env_id, (_kwargs, _steps) in ENV_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point=ENTRY_POINT, kwargs=_kwargs, max_episode_steps=_steps)

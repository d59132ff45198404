"""drrl-gym: dynamic-rank attention of a frozen language model as a Gymnasium benchmark.

Importing this package registers the environment ids (it imports neither torch nor any
model weights)::

    import gymnasium as gym
    import drrl_env

    env = gym.make("DRRL-Wikitext-v0")

or, without importing first, ``gym.make("drrl_env:DRRL-Wikitext-v0")``.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import sys

from gymnasium.envs.registration import register, registry

from drrl_env.rewards import DAMAGE_SCALE

__version__ = "0.1.0"

ENTRY_POINT = "drrl_env.envs.dynamic_rank:DynamicRankEnv"
ONE_SHOT_ENTRY_POINT = "drrl_env.envs.one_shot:OneShotEnv"

_TINY = {"model": "tiny-llama", "seq_len": 512, "segment_length": 128, "max_windows": 16}
_TOPK = {"method": "topk"}
_BUDGET = {"method": "topk", "keeps": (0.25, 0.5), "budget": 0.6}
_TOPP = {"method": "topp", "ranks": (8, 16, 64)}
_LONG = {"seq_len": 4096, "segment_length": 512}
_MIX = {"corpus": "mix"}
_TINY_LONG = {**_TINY, "seq_len": 2048, "segment_length": 512}
# topp budgets sit above each shape's floor (rank 8, p = 0: 0.24 of exact attention at
# 1024 tokens, 0.16 at 4096; the tiny model's 0.37 at 512 and 0.19 at 2048 tokens).

ENV_IDS: dict[str, dict] = {
    "DRRL-Wikitext-v0": {"backend": "cached"},
    "DRRL-Wikitext-Live-v0": {"backend": "live"},
    "DRRL-Wikitext-SVD-v0": {"backend": "cached", "method": "svd"},
    "DRRL-Wikitext-TopK-v0": {"backend": "cached", **_TOPK},
    "DRRL-Wikitext-TopK-Live-v0": {"backend": "live", **_TOPK},
    "DRRL-Wikitext-Budget-v0": {"backend": "cached", **_BUDGET},
    "DRRL-Wikitext-Budget-Live-v0": {"backend": "live", **_BUDGET},
    "DRRL-Wikitext-TopP-v0": {"backend": "cached", **_TOPP},
    "DRRL-Wikitext-TopP-Live-v0": {"backend": "live", **_TOPP},
    "DRRL-Wikitext-TopP-Budget-v0": {"backend": "cached", **_TOPP, "budget": 0.4},
    "DRRL-Long-TopP-v0": {"backend": "cached", **_LONG, **_TOPP},
    "DRRL-Long-TopP-Live-v0": {"backend": "live", **_LONG, **_TOPP},
    "DRRL-Long-TopP-Budget-v0": {"backend": "cached", **_LONG, **_TOPP, "budget": 0.3},
    "DRRL-Mix-TopP-v0": {"backend": "cached", **_MIX, **_TOPP},
    "DRRL-Mix-TopP-Live-v0": {"backend": "live", **_MIX, **_TOPP},
    "DRRL-Mix-TopP-Budget-v0": {"backend": "cached", **_MIX, **_TOPP, "budget": 0.4},
    "DRRL-Long-Mix-TopP-v0": {"backend": "cached", **_LONG, **_MIX, **_TOPP},
    "DRRL-Long-Mix-TopP-Live-v0": {"backend": "live", **_LONG, **_MIX, **_TOPP},
    "DRRL-Long-Mix-TopP-Budget-v0": {
        "backend": "cached",
        **_LONG,
        **_MIX,
        **_TOPP,
        "budget": 0.3,
    },
    "DRRL-Tiny-v0": {**_TINY, "method": "calibrated"},
    "DRRL-Tiny-Live-v0": {**_TINY, "method": "calibrated", "backend": "live"},
    "DRRL-Tiny-TopK-v0": {**_TINY, **_TOPK},
    "DRRL-Tiny-Budget-v0": {**_TINY, **_BUDGET},
    "DRRL-Tiny-TopP-v0": {**_TINY, **_TOPP},
    "DRRL-Tiny-TopP-Budget-v0": {**_TINY, **_TOPP, "budget": 0.5},
    "DRRL-Tiny-Long-TopP-v0": {**_TINY_LONG, **_TOPP},
    "DRRL-Tiny-Long-TopP-Live-v0": {**_TINY_LONG, **_TOPP, "backend": "live"},
    "DRRL-Tiny-Long-TopP-Budget-v0": {**_TINY_LONG, **_TOPP, "budget": 0.3},
    "DRRL-Tiny-Mix-TopP-v0": {**_TINY, **_MIX, **_TOPP},
    "DRRL-Tiny-Mix-TopP-Live-v0": {**_TINY, **_MIX, **_TOPP, "backend": "live"},
}
"""Registered id -> the ``gym.make`` keywords it stands for (see the README's table).

No id sets ``max_episode_steps``: an episode is as long as its configuration
(segments x layers, whatever ``seq_len`` is passed) and the environment terminates it.
"""

ONE_SHOT_IDS: dict[str, dict] = {
    "DRRL-Mix-TopP-OneShot-v0": {**ENV_IDS["DRRL-Mix-TopP-Budget-v0"]},
    "DRRL-Wikitext-Budget-OneShot-v0": {**ENV_IDS["DRRL-Wikitext-Budget-v0"]},
    "DRRL-Tiny-TopP-OneShot-v0": {**ENV_IDS["DRRL-Tiny-TopP-Budget-v0"]},
}
"""One-shot ids (:class:`~drrl_env.envs.one_shot.OneShotEnv`: one ``MultiDiscrete`` action
sets every cell of a window) -> their keywords: the budget ids' settings, with the reward in
damage units (the return is the only number a bandit learner sees; in the paper's units it
is about 120 for every policy, with a spread of a few hundredths)."""
for _kwargs in ONE_SHOT_IDS.values():
    _kwargs["damage_scale"] = DAMAGE_SCALE

for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point=ENTRY_POINT, kwargs=_kwargs)
for _env_id, _kwargs in ONE_SHOT_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point=ONE_SHOT_ENTRY_POINT, kwargs=_kwargs)


def _preload_in_forkserver_workers() -> None:
    """Let worker processes started by a forkserver know the ids (they import this package).

    Gymnasium 1.x has no plugin registry: a worker that never imported ``drrl_env`` cannot
    make ``"DRRL-Wikitext-v0"``. stable-baselines3's ``SubprocVecEnv`` starts its workers
    from a forkserver by default; preloading this package there (it imports no torch)
    registers the ids in every such worker. Modules the program preloads already are kept.
    """
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    if __name__ not in current:
        multiprocessing.set_forkserver_preload([*current, __name__])


_preload_in_forkserver_workers()


def _one_torch_thread_after_fork() -> None:
    """In a forked child of a process that imported torch: one intra-op torch thread.

    torch's CPU kernels run on a GNU OpenMP thread pool, which does not survive ``fork``: a
    child forked after the parent ran a multi-threaded kernel waits forever at its first
    parallel kernel for threads that were never copied. Live envs run the model in the
    process that makes them, and ``gym.make_vec(..., vectorization_mode="async")`` builds
    one there before it forks its workers (``fork`` is the default start method on Linux),
    so ``DRRL-*-Live-*`` workers hung. One thread runs every kernel inline, without the pool
    (what PyTorch's own DataLoader workers do); a worker may raise it again with
    ``torch.set_num_threads`` only if its parent never ran a parallel kernel.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_torch_thread_after_fork)

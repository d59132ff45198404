"""Build the rollout cache of a registered id ahead of training, resumably, with a progress bar.

::

    python -m drrl_env.build_cache DRRL-Wikitext-v0                       # train split
    python -m drrl_env.build_cache DRRL-Wikitext-TopK-v0 --splits train eval --workers 2
    python -m drrl_env.build_cache DRRL-Wikitext-v0 --max-windows 800 --executor ray
    python -m drrl_env.build_cache DRRL-Wikitext-v0 --rebuild                  # after a corruption

Each window is one shard of the cache, written atomically when it is done: an interrupted
build keeps its finished windows and the next call builds only the rest; several processes
or machines building the same cache split the windows (``--workers`` spawns local processes
that each load the model once; ``--executor ray`` runs each window as a Ray task, on a
local instance or the cluster at ``--address``, and this process writes the shards it gets
back). ``--set key=value`` passes further ``gym.make`` keywords (``method=topk``).

Every window built is then verified (checksums and ranges, :mod:`drrl_env.store`); a corrupt
one is rebuilt. ``--rebuild`` deletes the split's cached rollouts first (the fix a corrupt
shared array asks for). Each split's report (one JSON line) says what this process
``built``, what was ``already_built`` and what other processes built meanwhile
(``built_by_others``), and how many corrupt windows were ``repaired``.
"""

from __future__ import annotations

import ast
import json
import time
from dataclasses import dataclass, replace
from typing import Literal

import tyro

from drrl_env.envs.backends.cached import RolloutCache, window_builder
from drrl_env.envs.config import EnvConfig
from drrl_env.executors import execute


@dataclass(frozen=True)
class Args:
    """Build the cached rollouts of a registered environment id."""

    env_id: tyro.conf.Positional[str]
    """Registered id (``drrl_env.ENV_IDS``), e.g. DRRL-Wikitext-v0."""
    splits: tuple[Literal["train", "eval"], ...] = ("train",)
    """Splits to build."""
    max_windows: int | None = None
    """Windows per split (the first ones); None keeps the id's own setting."""
    set: tuple[str, ...] = ()
    """Further gym.make keywords as key=value (values parsed as Python literals)."""
    workers: int = 1
    """Local processes splitting the windows (each loads the model)."""
    threads: int | None = None
    """Torch threads per worker (default: torch's choice for one worker, 1 for several)."""
    executor: Literal["local", "ray"] = "local"
    """``ray``: one Ray task per window (``pip install 'drrl-gym[ray]'``)."""
    address: str | None = None
    """Ray cluster address; unset starts a local Ray instance."""
    cache_dir: str | None = None
    """Cache root (default ``$DRRL_CACHE_DIR`` or the user cache directory)."""
    rebuild: bool = False
    """Delete each split's cached rollouts first and build them anew (after a corruption)."""


def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """``key=value`` strings as keywords; values are Python literals where they parse.

    Raises:
        ValueError: An entry without ``=``.
    """
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r} is not key=value")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def configs(args: Args) -> list[EnvConfig]:
    """The configuration of every split to build (validated, nothing built).

    Raises:
        ValueError: Unknown id, bad keyword, bad worker count.
    """
    from drrl_env import ENV_IDS

    if args.env_id not in ENV_IDS:
        raise ValueError(f"unknown id {args.env_id!r}; registered: {', '.join(ENV_IDS)}")
    if isinstance(args.workers, bool) or args.workers < 1:
        raise ValueError(f"workers must be >= 1, got {args.workers}")
    kwargs = {**ENV_IDS[args.env_id], **parse_overrides(args.set), "backend": "cached"}
    if args.max_windows is not None:
        kwargs["max_windows"] = args.max_windows
    if args.cache_dir is not None:
        kwargs["cache_dir"] = args.cache_dir
    base = EnvConfig(**kwargs)
    return [replace(base, split=split) for split in args.splits]


def cached_windows(config: EnvConfig) -> tuple[list[int], str]:
    """The windows of ``config``'s rollout cache already on disk, and its folder.

    Builds and writes nothing: a configuration never built has no windows (its folder need
    not exist). A window counts once its shard is complete (shards are written atomically).
    """
    cache = RolloutCache(config)
    windows = cache.store.indices() if cache.store.has_shared() else []
    return windows, str(cache.store.folder)


def build_window(task: tuple[dict, int, int | None]) -> tuple[int, dict]:
    """One window of the configuration ``task[0]`` (a dict), as a Ray task returns it."""
    config, window, threads = task
    return window, window_builder(EnvConfig(**config), threads)(window)


def build_with_ray(cache: RolloutCache, args: Args) -> list[int]:
    """Build the missing windows of ``cache`` as Ray tasks; this process writes each shard.

    Returns:
        The windows this process wrote (not those another process wrote first).
    """
    cache.prepare()
    missing = cache.missing()
    config = {k: v for k, v in cache.config.as_dict().items() if k != "cache_dir"}
    tasks = [(config, window, args.threads or 1) for window in missing]
    built = []
    for done, (window, arrays) in enumerate(
        (result for _, result in execute(build_window, tasks, "ray", address=args.address)), 1
    ):
        if cache.store.write_shard(window, arrays):
            built.append(window)
        print(f"window {window} done ({done}/{len(tasks)})", flush=True)
    return built


def main(args: Args) -> dict:
    """Build every requested split; print and return what was built and how long it took.

    Per split: ``windows`` wanted, ``built`` by this process, ``already_built`` before it
    started, ``built_by_others`` (other processes sharing the build), ``repaired`` (corrupt
    windows found by the final verification and rebuilt), the folder and the seconds.
    """
    report = {}
    for config in configs(args):
        cache = RolloutCache(config)
        if args.rebuild:
            cache.store.remove_all()
        started = time.perf_counter()
        present = set(cache.store.indices())
        if args.executor == "ray":
            built = build_with_ray(cache, args)
        else:
            built = cache.build(workers=args.workers, threads=args.threads)
        repaired = cache.verify()
        wanted = cache.wanted()
        already = len(present.intersection(wanted))
        report[config.split] = {
            "folder": str(cache.store.folder),
            "windows": len(wanted),
            "built": len(built),
            "already_built": already,
            "built_by_others": len(wanted) - already - len(set(built)),
            "repaired": len(repaired),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps({config.split: report[config.split]}), flush=True)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))

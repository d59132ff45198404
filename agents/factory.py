"""One factory for every algorithm x policy pair, and save/load that round-trips.

::

    import gymnasium as gym
    import drrl_env
    from agents import load_agent, make_agent

    env = gym.make("DRRL-Tiny-v0")
    model = make_agent("maskable_ppo", env, policy="transformer", tensorboard_log="runs")
    model.learn(10_000)
    model.save("runs/agent")
    again = load_agent("runs/agent", env=env)
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecEnv

from agents.hyperparams import (
    ALGO_PARAMS,
    POLICY_PARAMS,
    default_hyperparams,
    field_names,
    with_overrides,
)
from agents.transformer_policy import StateTokenExtractor, layout_for_space

ALGOS: dict[str, type[BaseAlgorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "dqn": DQN,
    "maskable_ppo": MaskablePPO,
}
"""Algorithm name -> stable-baselines3 / sb3-contrib class."""

POLICIES: tuple[str, ...] = tuple(POLICY_PARAMS)
"""Policy names: ``mlp`` (SB3's MLP) and ``transformer`` (:class:`StateTokenExtractor`)."""

ALGO_ATTRIBUTE = "drrl_algo"
POLICY_ATTRIBUTE = "drrl_policy"
_DISCRETE_ONLY = ("dqn",)
_MANAGED = ("policy", "env", "policy_kwargs", "tensorboard_log", "seed", "verbose", "device")


def make_agent(
    algo: str,
    env: gym.Env | VecEnv | str,
    policy: str = "mlp",
    *,
    policy_kwargs: dict[str, Any] | None = None,
    tensorboard_log: str | Path | None = None,
    seed: int | None = None,
    verbose: int = 0,
    device: str = "cpu",
    **hyperparams: Any,
) -> BaseAlgorithm:
    """Build an untrained agent: ``algo`` in :data:`ALGOS`, ``policy`` in :data:`POLICIES`.

    Args:
        algo: ``ppo``, ``a2c``, ``dqn`` or ``maskable_ppo``.
        env: The training environment: a Gymnasium env, an SB3 VecEnv or a registered id.
        policy: ``mlp`` or ``transformer``.
        policy_kwargs: Merged over the policy's defaults (``features_extractor_kwargs`` too).
        tensorboard_log: TensorBoard log folder (None: no TensorBoard logging).
        seed: Seed of the algorithm, its networks and the env.
        verbose: SB3 verbosity.
        device: Torch device of the networks.
        **hyperparams: Overrides of the algorithm's defaults (:mod:`agents.hyperparams`) or
            any other keyword of the algorithm's constructor.

    Returns:
        The SB3 model; ``model.drrl_algo`` and ``model.drrl_policy`` name what it is.

    Raises:
        ValueError: Unknown algorithm, policy or hyperparameter; an env the algorithm or
            policy cannot handle (DQN on a non-discrete action space, MaskablePPO without
            ``action_masks()``, the transformer on a non dynamic-rank observation).
    """
    algo_class = algo_class_for(algo)
    check_policy_name(policy)
    env = gym.make(env) if isinstance(env, str) else env
    check_env_for(algo, env)
    params, extra = with_overrides(default_hyperparams(algo), hyperparams)
    _check_extra_hyperparams(algo, extra)
    model = algo_class(
        "MlpPolicy",
        env,
        policy_kwargs=build_policy_kwargs(policy, env, policy_kwargs),
        tensorboard_log=None if tensorboard_log is None else str(tensorboard_log),
        seed=seed,
        verbose=verbose,
        device=device,
        **asdict(params),
        **extra,
    )
    setattr(model, ALGO_ATTRIBUTE, algo)
    setattr(model, POLICY_ATTRIBUTE, policy)
    return model


def save_agent(model: BaseAlgorithm, path: str | Path) -> Path:
    """Save ``model`` (SB3 zip) with the name of its algorithm; returns the file written."""
    if getattr(model, ALGO_ATTRIBUTE, None) is None:
        setattr(model, ALGO_ATTRIBUTE, algo_name(model))
    path = Path(path)
    path = path if path.suffix == ".zip" else path.with_name(path.name + ".zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def load_agent(
    path: str | Path,
    env: gym.Env | VecEnv | None = None,
    algo: str | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> BaseAlgorithm:
    """Load a model saved by ``save_agent`` or ``model.save``.

    Args:
        path: The saved zip (the ``.zip`` suffix may be left out).
        env: The env to attach (needed to continue training); its spaces are checked.
        algo: The algorithm; read from the file when it was built by ``make_agent``.
        device: Torch device to load the networks onto.
        **kwargs: Passed to the SB3 ``load`` classmethod.

    Raises:
        ValueError: Unknown or undeterminable algorithm, or ``env``'s observation or action
            space differs from the saved one.
    """
    data, _, _ = load_from_zip_file(path, device=device, load_data=True)
    algo = _saved_algo(data, algo, path)
    if env is not None:
        check_spaces_match(data["observation_space"], data["action_space"], env)
    return ALGOS[algo].load(path, env=env, device=device, **kwargs)


def algo_class_for(algo: str) -> type[BaseAlgorithm]:
    """The class of ``algo``; ValueError listing the valid names if unknown."""
    if not isinstance(algo, str) or algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; valid algorithms: {', '.join(ALGOS)}")
    return ALGOS[algo]


def algo_name(model: BaseAlgorithm) -> str:
    """The :data:`ALGOS` name of a model's class."""
    for name, cls in ALGOS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is none of {', '.join(ALGOS)}")


def check_policy_name(policy: str) -> None:
    """ValueError listing the valid names if ``policy`` is unknown."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")


def check_env_for(algo: str, env: gym.Env | VecEnv) -> None:
    """Raise ValueError if ``algo`` cannot act in ``env``'s action space."""
    action_space = env.action_space
    if algo in _DISCRETE_ONLY and not isinstance(action_space, spaces.Discrete):
        raise ValueError(
            f"{algo} needs a Discrete action space, got {action_space}; "
            f"use one of {', '.join(a for a in ALGOS if a not in _DISCRETE_ONLY)}"
        )
    if algo == "maskable_ppo" and not is_masking_supported(env):
        raise ValueError("maskable_ppo needs an env with an action_masks() method")


def build_policy_kwargs(
    policy: str, env: gym.Env | VecEnv, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of ``policy`` for ``env``: the defaults, then ``overrides``."""
    check_policy_name(policy)
    params = POLICY_PARAMS[policy]()
    kwargs: dict[str, Any] = {"net_arch": list(params.net_arch)}
    if policy == "transformer":
        layout_for_space(env.observation_space)  # clear error before SB3 builds anything
        extractor = {**params.extractor_kwargs(), "rank_fractions": env_rank_fractions(env)}
        kwargs |= {"features_extractor_class": StateTokenExtractor}
        kwargs["features_extractor_kwargs"] = extractor
    overrides = dict(overrides or {})
    extractor_overrides = overrides.pop("features_extractor_kwargs", None)
    kwargs |= overrides
    if extractor_overrides:
        kwargs["features_extractor_kwargs"] = {
            **kwargs.get("features_extractor_kwargs", {}),
            **extractor_overrides,
        }
    return kwargs


def env_rank_fractions(env: gym.Env | VecEnv) -> tuple[float, ...] | None:
    """``rank / head_dim`` of the env's candidate ranks, or None if it has no rank grid."""
    ranks, head_dim = _env_attr(env, "ranks"), _env_attr(env, "head_dim")
    if ranks is None or head_dim is None:
        return None
    return tuple(float(r) / float(head_dim) for r in ranks)


def check_spaces_match(
    observation_space: spaces.Space, action_space: spaces.Space, env: gym.Env | VecEnv
) -> None:
    """ValueError if ``env``'s spaces differ from a saved model's."""
    got = env.observation_space
    if observation_space.shape != got.shape:
        raise ValueError(
            "incompatible observation sizes: the saved model expects "
            f"{_describe(observation_space)} but the env gives {_describe(got)}; use an env "
            "with the same rank grid or train a new agent"
        )
    if action_space != env.action_space:
        raise ValueError(
            f"incompatible action spaces: the saved model acts in {action_space} but the env "
            f"has {env.action_space}"
        )


def _describe(space: spaces.Space) -> str:
    try:
        layout = layout_for_space(space)
    except ValueError:
        return f"shape {space.shape}"
    return f"shape {space.shape} ({layout.n_ranks} candidate ranks)"


def _env_attr(env: gym.Env | VecEnv, name: str) -> Any:
    if isinstance(env, VecEnv):
        return env.get_attr(name, indices=[0])[0] if env.has_attr(name) else None
    try:
        return env.get_wrapper_attr(name)
    except AttributeError:
        return None


def _check_extra_hyperparams(algo: str, extra: dict[str, Any]) -> None:
    accepted = set(inspect.signature(ALGOS[algo].__init__).parameters) - {"self", *_MANAGED}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for {algo}; defaults: "
            f"{', '.join(field_names(ALGO_PARAMS[algo]))}; other accepted keywords: "
            f"{', '.join(sorted(accepted - set(field_names(ALGO_PARAMS[algo]))))}"
        )


def _saved_algo(data: dict[str, Any], algo: str | None, path: str | Path) -> str:
    saved = data.get(ALGO_ATTRIBUTE)
    if algo is None and saved is None:
        raise ValueError(
            f"{path} does not name its algorithm; pass algo= one of {', '.join(ALGOS)}"
        )
    algo = algo if algo is not None else saved
    algo_class_for(algo)
    if saved is not None and saved != algo:
        raise ValueError(f"{path} holds a {saved} agent, not {algo}")
    return algo

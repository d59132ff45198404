"""One factory for every algorithm x policy pair, and save/load that round-trips.

::

    import gymnasium as gym
    import drrl_env
    from agents import load_agent, make_agent

    env = gym.make("DRRL-Tiny-v0")
    model = make_agent("maskable_ppo", env, policy="transformer", tensorboard_log="runs")
    model.learn(10_000)
    save_agent(model, "runs/agent")
    again = load_agent("runs/agent", env=env)

An agent's actions are indices into its env's action grid ([rank, keep] settings), so the
same index means another setting in an env with another grid, model or method.
``make_agent`` and ``save_agent`` store the env's
:meth:`~drrl_env.envs.dynamic_rank.DynamicRankEnv.signature` (model, method, actions,
observation layout) in the zip, and ``load_agent(path, env=...)`` refuses an env whose
signature differs, naming each differing field.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import HumanOutputFormat, Logger
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecEnv

from agents.hyperparams import (
    ALGO_PARAMS,
    POLICY_PARAMS,
    default_hyperparams,
    field_names,
    with_overrides,
)
from agents.imitation import BehaviourCloning, DAgger
from agents.lagrangian import LagrangianPPO, soft_budget
from agents.transformer_policy import StateTokenExtractor, layout_for_space

ALGOS: dict[str, type[BaseAlgorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "dqn": DQN,
    "maskable_ppo": MaskablePPO,
    "bc": BehaviourCloning,
    "dagger": DAgger,
    "lagrangian_ppo": LagrangianPPO,
}
"""Algorithm name -> stable-baselines3 / sb3-contrib class."""

POLICIES: tuple[str, ...] = tuple(POLICY_PARAMS)
"""Policy names: ``mlp`` (SB3's MLP) and ``transformer`` (:class:`StateTokenExtractor`)."""

ALGO_ATTRIBUTE = "drrl_algo"
POLICY_ATTRIBUTE = "drrl_policy"
SIGNATURE_ATTRIBUTE = "drrl_env_signature"
"""Model attribute (saved in the zip's data) holding the training env's signature."""
_DISCRETE_ONLY = ("dqn", "bc", "dagger")
_MASKED = ("maskable_ppo", "bc", "dagger", "lagrangian_ppo")
_IMITATION = ("bc", "dagger")
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
        algo: ``ppo``, ``a2c``, ``dqn``, ``maskable_ppo``, ``bc``, ``dagger`` (budgeted
            cached envs) or ``lagrangian_ppo`` (budgeted envs with ``enforce_budget=False``).
        env: The training environment: a Gymnasium env, an SB3 VecEnv or a registered id.
        policy: ``mlp`` or ``transformer``.
        policy_kwargs: Merged over the policy's defaults (``features_extractor_kwargs`` too).
        tensorboard_log: TensorBoard log folder (None: no TensorBoard logging, and no
            log folder: :func:`folderless_logger`).
        seed: Seed of the algorithm, its networks and the env.
        verbose: SB3 verbosity.
        device: Torch device of the networks.
        **hyperparams: Overrides of the algorithm's defaults (:mod:`agents.hyperparams`) or
            any other keyword of the algorithm's constructor.

    Returns:
        The SB3 model; ``model.drrl_algo`` and ``model.drrl_policy`` name what it is and
        ``model.drrl_env_signature`` holds ``env``'s signature (None for an env without
        ``signature()``).

    Raises:
        ValueError: Unknown algorithm, policy or hyperparameter; an env the algorithm or
            policy cannot handle (DQN on a non-discrete action space, MaskablePPO without
            ``action_masks()``, the transformer on a non dynamic-rank observation).
    """
    algo_class = algo_class_for(algo)
    check_policy_name(policy)
    env = gym.make(env) if isinstance(env, str) else env
    check_env_for(algo, env)
    params, extra = with_overrides(default_hyperparams(algo, is_budgeted(env)), hyperparams)
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
    setattr(model, SIGNATURE_ATTRIBUTE, env_signature(env))
    return _without_log_folder(model)


def folderless_logger(verbose: int) -> Logger:
    """SB3 logger without a folder: stdout at ``verbose >= 1``, else nothing.

    Without TensorBoard, SB3's own logger still makes an empty ``SB3-<date>`` folder in the
    system temporary directory at every ``learn``; this one writes no file.
    """
    return Logger(folder=None, output_formats=[HumanOutputFormat(sys.stdout)] if verbose else [])


def _without_log_folder(model: BaseAlgorithm) -> BaseAlgorithm:
    """``model`` logging through :func:`folderless_logger` unless it logs to TensorBoard."""
    if model.tensorboard_log is None:
        model.set_logger(folderless_logger(model.verbose))
    return model


def is_budgeted(env: gym.Env | VecEnv) -> bool:
    """Whether ``env`` (or the first copy of a VecEnv) has a FLOPs budget."""
    return getattr(_env_attr(env, "config"), "budget", None) is not None


def save_agent(model: BaseAlgorithm, path: str | Path, env: gym.Env | VecEnv | None = None) -> Path:
    """Save ``model`` (SB3 zip) with its algorithm's name and its env's signature.

    Args:
        model: The agent.
        path: Where to write; ``.zip`` is appended unless the name ends with it.
        env: The env whose signature is stored. None: the model's own env
            (``model.get_env()``), else the signature the model already carries (set by
            :func:`make_agent` or read by :func:`load_agent`).

    Returns:
        The file written.
    """
    if getattr(model, ALGO_ATTRIBUTE, None) is None:
        setattr(model, ALGO_ATTRIBUTE, algo_name(model))
    source = env if env is not None else model.get_env()
    if source is not None:
        setattr(model, SIGNATURE_ATTRIBUTE, env_signature(source))
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
        env: The env to attach (needed to continue training). Its signature must equal the
            one saved with the agent, and its spaces the saved spaces; a file saved without
            a signature loads with a warning.
        algo: The algorithm; read from the file when it was built by ``make_agent``.
        device: Torch device to load the networks onto.
        **kwargs: Passed to the SB3 ``load`` classmethod.

    Raises:
        FileNotFoundError: Neither ``path`` nor ``path`` + ``.zip`` is a file; the message
            shows the absolute path looked for.
        ValueError: Unknown or undeterminable algorithm; ``env``'s signature differs from
            the saved one (the message names each differing field with both values), or
            ``env`` has no signature while the file has one; ``env``'s observation or action
            space differs from the saved one.
    """
    path = resolve_agent_path(path)
    custom_objects = kwargs.get("custom_objects")
    data, _, _ = load_from_zip_file(
        path, device=device, load_data=True, custom_objects=custom_objects
    )
    algo = _saved_algo(data, algo, path)
    if env is not None:
        check_signature_match(data.get(SIGNATURE_ATTRIBUTE), env, path)
        check_spaces_match(data["observation_space"], data["action_space"], env)
    return _without_log_folder(ALGOS[algo].load(path, env=env, device=device, **kwargs))


def resolve_agent_path(path: str | Path) -> Path:
    """The saved agent file of ``path``: ``path`` itself, or ``path`` + ``.zip`` as SB3 saves.

    Raises:
        FileNotFoundError: Neither is a file; the message shows the absolute ``.zip`` path.
    """
    path = Path(path)
    if path.is_file():
        return path
    zipped = path if path.name.endswith(".zip") else path.with_name(path.name + ".zip")
    if zipped.is_file():
        return zipped
    raise FileNotFoundError(f"no saved agent at {zipped.resolve()}")


def env_signature(env: gym.Env | VecEnv) -> dict[str, Any] | None:
    """``env.unwrapped.signature()`` as plain JSON values (first env of a VecEnv).

    Returns:
        The signature, or None for an env without a ``signature()`` method.
    """
    if isinstance(env, VecEnv):
        if not env.has_attr("signature"):
            return None
        signature = env.env_method("signature", indices=[0])[0]
    else:
        method = _env_attr(env, "signature")
        if method is None:
            return None
        signature = method()
    return json.loads(json.dumps(signature))


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per field (every key of either) whose value differs, with both values."""
    lines = []
    for key in [*saved, *(key for key in current if key not in saved)]:
        if key not in current:
            lines.append(f"{key}: the agent's {saved[key]!r}, missing from the env's")
        elif key not in saved:
            lines.append(f"{key}: missing from the agent's, the env's {current[key]!r}")
        elif saved[key] != current[key]:
            lines.append(f"{key}: {_value_difference(key, saved[key], current[key])}")
    return lines


def check_signature_match(
    saved: dict[str, Any] | None, env: gym.Env | VecEnv, path: str | Path = "the agent"
) -> None:
    """Refuse an env whose actions or inputs mean something else than the saved agent's.

    Args:
        saved: The signature saved with the agent (None: an older file without one).
        env: The env the agent is loaded into.
        path: Named in the messages.

    Raises:
        ValueError: The signatures differ (one line per differing field), or the agent has
            a signature but ``env`` has no ``signature()``.
    """
    current = env_signature(env)
    if saved is None:
        if current is not None:
            warnings.warn(
                f"{path} was saved without an env signature: cannot check that its actions "
                "and observations mean the same in this env (same action grid, model, method); "
                "save it again with save_agent(model, path, env=training_env)",
                UserWarning,
                stacklevel=3,
            )
        return
    if current is None:
        raise ValueError(
            f"{path} was trained on a dynamic-rank env ({_brief(saved)}) but the env has no "
            "signature() to check it against"
        )
    differences = signature_differences(saved, current)
    if differences:
        raise ValueError(
            f"{path} was trained on an env whose actions or observations mean something "
            "else; differing fields:\n  "
            + "\n  ".join(differences)
            + "\nuse an env built like the training env or train a new agent"
        )


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
    if algo in _MASKED and not is_masking_supported(env):
        raise ValueError(f"{algo} needs an env with an action_masks() method")
    if algo in _IMITATION and not is_budgeted(env):
        raise ValueError(
            f"{algo} imitates the per-window optimum under a budget: pass a budgeted cached "
            "env, e.g. gym.make('DRRL-Mix-TopP-Budget-v0')"
        )
    if algo == "lagrangian_ppo":
        soft_budget(env)  # ValueError without a budget or under the wall


def build_policy_kwargs(
    policy: str, env: gym.Env | VecEnv, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of ``policy`` for ``env``: the defaults, then ``overrides``."""
    check_policy_name(policy)
    if policy == "transformer":
        layout_for_space(env.observation_space)  # clear error before SB3 builds anything
    kwargs = default_policy_kwargs(policy, env_rank_fractions(env))
    layout = _env_attr(env, "layout")
    if policy == "transformer" and layout is not None:  # the env's own (budgeted or not)
        kwargs["features_extractor_kwargs"]["layout"] = layout
    overrides = dict(overrides or {})
    extractor_overrides = overrides.pop("features_extractor_kwargs", None)
    kwargs |= overrides
    if extractor_overrides:
        kwargs["features_extractor_kwargs"] = {
            **kwargs.get("features_extractor_kwargs", {}),
            **extractor_overrides,
        }
    return kwargs


def default_policy_kwargs(
    policy: str, rank_fractions: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of ``policy``'s defaults (:data:`POLICY_PARAMS`), for any env.

    Args:
        policy: ``mlp`` or ``transformer``.
        rank_fractions: ``rank / head_dim`` of the env's grid, for the transformer's
            extractor (None: the default grid's values).
    """
    check_policy_name(policy)
    params = POLICY_PARAMS[policy]()
    kwargs: dict[str, Any] = {"net_arch": list(params.net_arch)}
    if policy == "transformer":
        kwargs["features_extractor_class"] = StateTokenExtractor
        kwargs["features_extractor_kwargs"] = {
            **params.extractor_kwargs(),
            "rank_fractions": rank_fractions,
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
    accepted: set[str] = set()
    for klass in ALGOS[algo].__mro__:  # an __init__ taking **kwargs hands them to its parent's
        parameters = inspect.signature(klass.__init__).parameters
        accepted |= {n for n, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    accepted -= {"self", *_MANAGED}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for {algo}; defaults: "
            f"{', '.join(field_names(ALGO_PARAMS[algo]))}; other accepted keywords: "
            f"{', '.join(sorted(accepted - set(field_names(ALGO_PARAMS[algo]))))}"
        )


_SHOWN_INDICES = 8


def _value_difference(key: str, before: Any, after: Any) -> str:
    if not (isinstance(before, list) and isinstance(after, list)):
        return f"the agent's {before!r}, the env's {after!r}"
    item = "action" if key == "actions" else "index"
    parts = []
    if len(before) != len(after):
        parts.append(f"the agent has {len(before)} {key}, the env {len(after)}")
    differing = [i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b]
    shown = ", ".join(
        f"{item} {i}: {before[i]!r} vs {after[i]!r}" for i in differing[:_SHOWN_INDICES]
    )
    if differing:
        more = len(differing) - _SHOWN_INDICES
        parts.append(
            f"{len(differing)} of {min(len(before), len(after))} differ (agent vs env) - "
            + shown
            + (f", and {more} more" if more > 0 else "")
        )
    return "; ".join(parts)


def _brief(signature: dict[str, Any]) -> str:
    return ", ".join(f"{k}={signature[k]!r}" for k in ("model", "method") if k in signature)


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

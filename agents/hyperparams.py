"""Default hyperparameters, one frozen dataclass per algorithm and per policy (rl-zoo style).

The defaults suit short CPU runs on the dynamic-rank environments: episodes are
``segments * layers`` steps (16 on ``DRRL-Tiny-v0``, 120 on the SmolLM2 ids), so rollouts
hold a few episodes and networks stay small. Every field is a keyword argument of the
stable-baselines3 / sb3-contrib constructor of that algorithm; ``make_agent`` overrides any
of them by name::

    make_agent("ppo", env, n_steps=256, learning_rate=1e-3)

These dataclasses are the one source of the defaults: the RL Zoo files in ``hyperparams/``
are generated from them by ``python -m agents.zoo`` (a test fails until they are
regenerated after a change here), so a new field or a new default reaches rl_zoo3 too.

Discount factor: :data:`DISCOUNT` (0.5) for every algorithm, not the usual 0.99. The
problem is close to a contextual bandit: each step's reward is charged at once (the
perturbation of a rank change included, and the previous rank is in the observation), and
the profit of a good rank over full rank is a few thousandths of a reward unit. With 0.99
that signal drowns in the noise of about a hundred future stochastic rewards; on the SmolLM2
env PPO then collapsed to rank 8 at ``beta = 0.3`` (a worse return than full rank) and, with
the FLOPs term off, failed to find full rank, the trivially optimal policy
(``experiments/reward_ablation.py``; README, "Reward weights").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

DISCOUNT = 0.5
"""Default discount factor ``gamma`` of every algorithm (see the module docstring)."""

BUDGET_DISCOUNT = 0.99
"""Discount factor of every algorithm on a budgeted env (``budget=``).

A budget makes the problem sequential: the action wall lets a step spend only what the
steps after it will not need, so the value of an action depends on the whole rest of the
episode (segments x layers steps, 120 on the SmolLM2 ids). A short horizon (0.5 looks about
two steps ahead) would spend the budget greedily early and leave the late segments, whose
calls see the most keys and cost the most, to the wall. With the FLOPs and perturbation
terms gone (the reward is the fidelity term alone) the noise that made 0.99 collapse on
unbudgeted envs is gone too: every step's reward is a measured fidelity, not a small
difference of large terms."""


@dataclass(frozen=True)
class PPOParams:
    """Proximal Policy Optimisation (stable-baselines3 ``PPO``)."""

    learning_rate: float = 3e-4
    n_steps: int = 128
    batch_size: int = 64
    n_epochs: int = 4
    gamma: float = DISCOUNT
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass(frozen=True)
class MaskablePPOParams(PPOParams):
    """PPO with invalid-action masking (sb3-contrib ``MaskablePPO``): the PPO defaults."""


@dataclass(frozen=True)
class BCParams(MaskablePPOParams):
    """Behaviour cloning of the per-window optimum (:class:`agents.imitation.BehaviourCloning`).

    The PPO fields size the network and serve a later PPO fine-tuning; the imitation fields
    drive ``learn``. Epochs: measured on ``DRRL-Mix-TopP-Budget-v0`` at budget 0.45 (12
    cached train windows, 5,760 labelled steps, 24 cached eval windows): with 20 epochs at
    1e-3 (Adam) DAgger's train accuracy stayed at 0.47 and its eval return below the static
    per-layer allocation's (119.64 against 119.71); with 100 epochs it reached 0.61 and
    119.78, above the best constant schedule of every cell (119.76), in 13 s. Batches of 256
    steps are about two windows."""

    imitation_epochs: int = 100
    imitation_batch_size: int = 256
    imitation_learning_rate: float = 1e-3


@dataclass(frozen=True)
class DAggerParams(BCParams):
    """DAgger from the per-window optimum (:class:`agents.imitation.DAgger`): 4 rounds, the
    expert acting with probability 1, 1/2, 1/4, 1/8 (Ross et al.'s decaying mixture); the
    later rounds label the states the policy itself reaches, where cloning alone has no
    data (after a mistake that spent budget early)."""

    rounds: int = 4


@dataclass(frozen=True)
class LagrangianPPOParams(MaskablePPOParams):
    """Lagrangian PPO on a soft budget (:class:`agents.lagrangian.LagrangianPPO`): the PPO
    fields, then the start and step size of the multiplier ``lam`` that prices a unit of
    episode cost (the episode's executed FLOPs as a fraction of exact attention's).

    Units assumed: the paper's reward (``damage_scale`` unset, as on every registered
    sequential budget id and in ``experiments/planning.py`` by default), a step's reward its
    fidelity, close to 1. The price must match what a decision trades, not that level (a
    constant per step changes no choice): the fidelity lost against the cost saved. On the
    cached train windows of ``DRRL-Mix-TopP-v0``, the static allocation's summed
    ``1 - cosine`` grows by 0.108 from budget 0.6 to 0.45 (:data:`drrl_env.rewards.DAMAGE_SCALE`),
    a price of about 0.7 return units per unit of episode cost where a budget of about
    0.5 binds, and by 0.018 from exact attention down to 0.6, about 0.05. A multiplier of
    the reward's level (order ``steps``, 120) would be a hundred times too high and push
    every cell to the floor. In damage units (``damage_scale=s``) the fidelity lost, and so
    the price, is ``s`` times larger: scale ``lambda_learning_rate`` by ``s`` (1.0 at
    ``DAMAGE_SCALE = 10``).

    ``lambda_init = 0``: no price until the policy overspends. The ascent corrects any
    start, and a positive one would be a guess at the shadow price, whose scale is the
    reward's units.

    ``lambda_learning_rate = 0.1``: an untrained policy overspends a budget of 0.4-0.6 by
    0.3-0.5 (random actions spend 0.69-1.04 of exact FLOPs per episode on
    ``DRRL-Tiny-TopP-Budget-v0``), so ``lam`` rises by 0.03-0.05 a rollout and reaches the
    range 0.05-0.7 within about 20 rollouts (2,560 steps at ``n_steps = 128``), a tenth of
    a default run; the scatter of one rollout's mean cost (a few hundredths to a tenth)
    moves it by at most 0.01 a rollout, small against that range.
    """

    lambda_init: float = 0.0
    lambda_learning_rate: float = 0.1


@dataclass(frozen=True)
class A2CParams:
    """Advantage Actor-Critic (stable-baselines3 ``A2C``)."""

    learning_rate: float = 7e-4
    n_steps: int = 16
    gamma: float = DISCOUNT
    gae_lambda: float = 1.0
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass(frozen=True)
class DQNParams:
    """Deep Q-Network (stable-baselines3 ``DQN``)."""

    learning_rate: float = 1e-3
    buffer_size: int = 20_000
    learning_starts: int = 64
    batch_size: int = 32
    tau: float = 1.0
    gamma: float = DISCOUNT
    train_freq: int = 4
    gradient_steps: int = 1
    target_update_interval: int = 256
    exploration_fraction: float = 0.3
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.05


@dataclass(frozen=True)
class MlpPolicyParams:
    """SB3's default MLP on the flat observation."""

    net_arch: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the policy / value (or Q) network."""


@dataclass(frozen=True)
class TransformerPolicyParams:
    """The state-token Transformer encoder (see :mod:`agents.transformer_policy`)."""

    d_model: int = 32
    """Token width."""
    n_heads: int = 4
    """Attention heads per encoder layer (must divide ``d_model``)."""
    n_layers: int = 2
    """Encoder layers."""
    dim_feedforward: int = 64
    """Hidden width of each encoder layer's feed-forward block."""
    dropout: float = 0.0
    """Dropout inside the encoder (0: deterministic training and prediction)."""
    features_dim: int = 64
    """Width of the pooled feature vector handed to the policy / value heads."""
    net_arch: tuple[int, ...] = (64,)
    """Hidden layer widths of the heads on top of the encoder."""

    def extractor_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~agents.transformer_policy.StateTokenExtractor`."""
        return {k: v for k, v in asdict(self).items() if k != "net_arch"}


ALGO_PARAMS: dict[str, type] = {
    "ppo": PPOParams,
    "a2c": A2CParams,
    "dqn": DQNParams,
    "maskable_ppo": MaskablePPOParams,
    "bc": BCParams,
    "dagger": DAggerParams,
    "lagrangian_ppo": LagrangianPPOParams,
}

POLICY_PARAMS: dict[str, type] = {
    "mlp": MlpPolicyParams,
    "transformer": TransformerPolicyParams,
}


def field_names(params_class: type) -> tuple[str, ...]:
    """Names of the fields of a parameter dataclass."""
    return tuple(f.name for f in fields(params_class))


def default_hyperparams(algo: str, budgeted: bool = False) -> Any:
    """The default hyperparameters of ``algo`` (one of :data:`ALGO_PARAMS`).

    Args:
        algo: The algorithm.
        budgeted: For a budgeted env: the discount is :data:`BUDGET_DISCOUNT`.

    Raises:
        ValueError: ``algo`` is unknown; the message lists the valid names.
    """
    if algo not in ALGO_PARAMS:
        raise ValueError(f"unknown algorithm {algo!r}; valid: {sorted(ALGO_PARAMS)}")
    params = ALGO_PARAMS[algo]()
    return replace(params, gamma=BUDGET_DISCOUNT) if budgeted else params


def with_overrides(params: Any, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split ``overrides`` into the dataclass's own fields (applied) and the rest (returned)."""
    names = set(field_names(type(params)))
    own = {k: v for k, v in overrides.items() if k in names}
    rest = {k: v for k, v in overrides.items() if k not in names}
    return replace(params, **own), rest

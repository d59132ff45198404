"""Agents for the dynamic-rank environments: SB3 algorithms, policies, baselines, leaderboard.

- :func:`make_agent` / :func:`load_agent` / :func:`save_agent`: any of :data:`ALGOS`
  (``ppo``, ``a2c``, ``dqn``, ``maskable_ppo``; ``bc`` and ``dagger``, imitating the
  per-window optimum, :mod:`agents.imitation`; ``lagrangian_ppo``, pricing a soft budget,
  :mod:`agents.lagrangian`) with any of :data:`POLICIES` (``mlp``, ``transformer``),
  defaults in :mod:`agents.hyperparams`;
- :class:`StateTokenExtractor`: the paper's Transformer over state tokens, an SB3
  ``BaseFeaturesExtractor``;
- baselines with SB3's ``predict`` interface, in one registry (:data:`BASELINES`,
  :func:`make_baseline`, :func:`register_baseline`, :class:`Baseline`);
- :class:`RankMetricsCallback` and the checkpoint / early-stopping helpers;
- :func:`evaluate_policy_on_windows`, :func:`leaderboard`, :func:`replay_csv`.
"""

from __future__ import annotations

from agents.baseline_registry import (
    BASELINES,
    Baseline,
    BaselineContext,
    register_baseline,
)
from agents.baselines import (
    BaselinePolicy,
    EnergyThresholdPolicy,
    FullRankPolicy,
    GreedyOraclePolicy,
    SchedulePolicy,
    StaticRankPolicy,
    UniformRandomPolicy,
    energy_threshold_action,
    make_baseline,
    standard_baselines,
)
from agents.callbacks import (
    RankMetricsCallback,
    checkpoint_callback,
    early_stopping_callback,
    training_callbacks,
)
from agents.evaluation import (
    COLUMNS,
    evaluate_policy_on_windows,
    leaderboard,
    predict_action,
    read_csv,
    replay_csv,
    summarize,
)
from agents.factory import ALGOS, POLICIES, load_agent, make_agent, save_agent
from agents.hyperparams import (
    A2CParams,
    DQNParams,
    MaskablePPOParams,
    MlpPolicyParams,
    PPOParams,
    TransformerPolicyParams,
    default_hyperparams,
)
from agents.transformer_policy import StateTokenExtractor, layout_for_space, token_spec

__all__ = [
    "ALGOS",
    "BASELINES",
    "Baseline",
    "BaselineContext",
    "COLUMNS",
    "POLICIES",
    "A2CParams",
    "BaselinePolicy",
    "DQNParams",
    "EnergyThresholdPolicy",
    "FullRankPolicy",
    "GreedyOraclePolicy",
    "MaskablePPOParams",
    "MlpPolicyParams",
    "PPOParams",
    "RankMetricsCallback",
    "StateTokenExtractor",
    "SchedulePolicy",
    "StaticRankPolicy",
    "TransformerPolicyParams",
    "UniformRandomPolicy",
    "checkpoint_callback",
    "default_hyperparams",
    "early_stopping_callback",
    "energy_threshold_action",
    "evaluate_policy_on_windows",
    "layout_for_space",
    "leaderboard",
    "load_agent",
    "make_agent",
    "make_baseline",
    "register_baseline",
    "predict_action",
    "read_csv",
    "replay_csv",
    "save_agent",
    "standard_baselines",
    "summarize",
    "token_spec",
    "training_callbacks",
]

"""Proxy validity: each fidelity term's cached prediction of a schedule's damage, and the real one.

A schedule (the actions of one window) is played on the cached backend, where every
fidelity term's raw measurement is summed over the episode (teacher forced), and on the
live backend, which runs the model closed loop and measures the window's perplexity. The
rank correlation of the two over many schedules says how well a term orders schedules by
what they cost the model (``experiments/proxy_validity.py``, notebook 05).
"""

from __future__ import annotations

import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pandas as pd

from agents.baselines import EnergyThresholdPolicy, GreedyOraclePolicy
from agents.evaluation import actor
from drrl_env.envs.dynamic_rank import DynamicRankEnv
from drrl_env.episodes import play_episode
from drrl_env.replay import replay

PROXIES = {
    "cosine": ("sum_one_minus_cosine", "sum over cells of 1 - cosine"),
    "loss": ("sum_dnll_taylor", "sum over cells of the first-order loss change"),
    "loss-fisher": ("sum_dnll_fisher", "sum over cells of the second-order loss change"),
}
"""Fidelity term -> (column of its predicted damage, what the column sums)."""


def play(env: gym.Env, policy, window: int) -> np.ndarray:
    """The executed actions (S, L) of ``policy`` on ``window`` of ``env``."""
    return play_episode(env, actor(policy), window).actions


def schedules(
    cached: gym.Env,
    window: int,
    random: int = 14,
    mixtures: int = 12,
    energy_taus: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99),
    greedy_betas: tuple[float, ...] = (0.1, 0.3, 1.0),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every schedule of one window, by name: static, random, mixture, energy, greedy.

    Args:
        cached: The cached env the schedules are chosen on (its grid, windows, lookups).
        window: The window.
        random: Uniform random schedules.
        mixtures: Random mixtures of two actions (each cell picks one of the two).
        energy_taus: Energy thresholds (one schedule each).
        greedy_betas: FLOPs weights of the greedy oracles, one per fidelity term and weight.
        seed: Seed of the random and mixed schedules (with the window).
    """
    base = cached.unwrapped
    shape, n_actions = (base.n_segments, base.n_layers), len(base.actions)
    rng = np.random.default_rng([seed, window])
    plan = {f"static_{s.label()}": np.full(shape, i) for i, s in enumerate(base.actions.settings)}
    for k in range(random):
        plan[f"random_{k}"] = rng.integers(0, n_actions, size=shape)
    for k in range(mixtures):
        first, second = rng.choice(n_actions, size=2, replace=False)
        share = rng.uniform(0.2, 0.8)
        plan[f"mixture_{k}"] = np.where(rng.random(shape) < share, first, second)
    for tau in energy_taus:
        plan[f"energy_{tau:g}"] = play(cached, EnergyThresholdPolicy(cached, tau), window)
    for term in PROXIES:
        for beta in greedy_betas:
            config = replace(base.config, fidelity=term, beta=beta, gamma=0.0, budget=None)
            env = DynamicRankEnv(config)
            plan[f"greedy_{term}_beta{beta:g}"] = play(env, GreedyOraclePolicy(env), window)
    return plan


def cached_proxies(cached: gym.Env, window: int, actions: np.ndarray) -> dict[str, float]:
    """Each term's predicted damage of a schedule, from the cached (teacher-forced) cells."""
    base = cached.unwrapped
    index = np.asarray(actions)[..., None]  # (S, L, 1)

    def total(name: str) -> float:  # verified reads of the window's (S, L, A) cells
        return float(np.take_along_axis(base.rollout(name, window), index, -1).sum())

    steps = actions.size
    return {
        "sum_one_minus_cosine": steps - total("cosine"),
        "sum_dnll_taylor": total("dnll_taylor"),
        "sum_dnll_fisher": total("dnll_fisher"),
    }


def live_change(live: gym.Env, window: int, actions: np.ndarray) -> dict[str, float]:
    """The live episode of a schedule: perplexities, the change of log-perplexity, and the
    mean token KL and top-1 agreement against exact attention on the same window."""
    result = replay(live.unwrapped, window, actions)
    perplexity, full = result.summary["perplexity"], result.summary["perplexity_full"]
    flops = result.summary["flops_ratio"]
    return {
        "perplexity": perplexity,
        "perplexity_full": full,
        "delta_log_ppl": math.log(perplexity / full),
        "mean_kl": result.summary["mean_kl"],
        "top1_agreement": result.summary["top1_agreement"],
        "flops_ratio": flops,
    }


def correlations(rows: pd.DataFrame) -> pd.DataFrame:
    """Spearman and Pearson correlation of each term's predicted damage with the live one.

    ``spearman``/``pearson`` against the change of log-perplexity; ``spearman_kl``/
    ``pearson_kl`` against the mean token KL to exact attention (NaN when the rows have no
    ``mean_kl``, e.g. runs from before it was measured).
    """
    table = []
    has_kl = "mean_kl" in rows and rows["mean_kl"].notna().all()
    for term, (column, _) in PROXIES.items():
        # Spearman's rho: Pearson's r of the ranks (ties share their average rank)
        record = {"term": term, "proxy": column}
        for suffix, target in (("", "delta_log_ppl"), ("_kl", "mean_kl")):
            if target == "mean_kl" and not has_kl:
                record[f"spearman{suffix}"] = record[f"pearson{suffix}"] = math.nan
                continue
            record[f"spearman{suffix}"] = rows[column].rank().corr(rows[target].rank())
            record[f"pearson{suffix}"] = rows[column].corr(rows[target], method="pearson")
        record["schedules"] = len(rows)
        table.append(record)
    return pd.DataFrame(table).sort_values("spearman", ascending=False, ignore_index=True)

"""Compare RL agents and baselines on held-out text: the measured version of the paper's Table 1.

For each method: train every algorithm x policy x seed on the train windows (cached backend),
then evaluate each agent and every baseline on the same held-out eval windows with the live
backend (closed loop, real perplexity). Writes under ``results/<run name>/``: per-policy
leaderboard CSVs (replayable), ``per_window.csv``, ``summary.csv``, ``table.md``,
``pareto.png``, ``config.json``, the models and TensorBoard logs (:mod:`agents.compare`).

    python experiments/compare_agents.py                 # quick configuration
    python experiments/compare_agents.py --full          # larger configuration
    python experiments/compare_agents.py --run-name quick --resume
    python experiments/compare_agents.py --executor ray --address 10.0.0.1:6379
    python experiments/compare_agents.py --env-id DRRL-Wikitext-Budget-v0 --budget 0.45
"""

from __future__ import annotations

import tyro

from agents.compare import Args, main
from harness.runs import run_main

__all__ = ["Args", "main"]

if __name__ == "__main__":
    run_main(main, tyro.cli(Args))

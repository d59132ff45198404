"""Tables and plots from leaderboard rows: summaries over windows and seeds, Pareto plots.

Every number here is computed from the per-window CSV rows of
:func:`agents.evaluation.evaluate_policy_on_windows`; the Markdown table is generated from
the summary frame, never typed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = (
    "method",
    "policy",
    "kind",
    "perplexity",
    "perplexity_std",
    "delta_ppl_pct",
    "delta_ppl_pct_std",
    "attention_gflops",
    "flops_reduction_pct",
    "flops_reduction_pct_std",
    "mean_fidelity",
    "mean_rank",
    "return",
    "seeds",
    "windows",
)


def _per_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, policy, seed): window means (perplexity: geometric mean)."""
    keys = ["method", "policy", "kind", "seed"]
    grouped = frame.groupby(keys, sort=False)
    out = grouped[["mean_fidelity", "flops_reduction", "mean_rank", "return"]].mean()
    out["perplexity"] = grouped["perplexity"].apply(lambda p: float(np.exp(np.log(p).mean())))
    out["perplexity_full"] = grouped["perplexity_full"].apply(
        lambda p: float(np.exp(np.log(p).mean()))
    )
    out["attention_gflops"] = grouped.apply(
        lambda g: float(((1 - g["flops_reduction"]) * g["attention_flops_full"]).mean() / 1e9),
        include_groups=False,
    )
    out["windows"] = grouped.size()
    return out.reset_index()


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (method, policy): means and standard deviations over seeds."""
    seeds = _per_seed(frame)
    seeds["delta_ppl_pct"] = 100 * (seeds["perplexity"] / seeds["perplexity_full"] - 1)
    seeds["flops_reduction_pct"] = 100 * seeds["flops_reduction"]
    grouped = seeds.groupby(["method", "policy", "kind"], sort=False)
    mean = grouped[
        [
            "perplexity",
            "delta_ppl_pct",
            "attention_gflops",
            "flops_reduction_pct",
            "mean_fidelity",
            "mean_rank",
            "return",
            "windows",
        ]
    ].mean()
    std = grouped[["perplexity", "delta_ppl_pct", "flops_reduction_pct"]].std(ddof=0)
    table = mean.join(std.add_suffix("_std")).reset_index()
    table["seeds"] = grouped.size().to_numpy()
    table["windows"] = table["windows"].astype(int)
    return table[list(SUMMARY_COLUMNS)]


def _cell(value: float, std: float | None, digits: int) -> str:
    if std is None or not np.isfinite(std) or std == 0:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table (one per method, stacked)."""
    header = (
        "| method | policy | perplexity | Δ ppl vs full | attention GFLOPs executed "
        "| FLOPs reduction | fidelity | mean rank | return | seeds × windows |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for _, row in summary.iterrows():
        rows.append(
            f"| {row['method']} | {row['policy']} "
            f"| {_cell(row['perplexity'], row['perplexity_std'], 2)} "
            f"| {_cell(row['delta_ppl_pct'], row['delta_ppl_pct_std'], 1)} % "
            f"| {row['attention_gflops']:.2f} "
            f"| {_cell(row['flops_reduction_pct'], row['flops_reduction_pct_std'], 1)} % "
            f"| {row['mean_fidelity']:.3f} | {row['mean_rank']:.1f} | {row['return']:.2f} "
            f"| {row['seeds']} × {row['windows']} |"
        )
    return "\n".join(rows)


def write_markdown(summary: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown_table(summary) + "\n")
    return path


def pareto_plot(summary: pd.DataFrame, path: str | Path) -> Path:
    """Executed attention-FLOPs reduction vs perplexity increase, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(summary["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        part = summary[summary["method"] == method]
        static = part[part["policy"].str.startswith("static_") | (part["policy"] == "full_rank")]
        static = static.sort_values("flops_reduction_pct")
        ax.plot(
            static["flops_reduction_pct"],
            static["delta_ppl_pct"],
            "o-",
            color="grey",
            label="static ranks",
        )
        for _, row in part.iterrows():
            if row["policy"] in set(static["policy"]):
                ax.annotate(
                    row["policy"].removeprefix("static_"),
                    (row["flops_reduction_pct"], row["delta_ppl_pct"]),
                    fontsize=7,
                )
                continue
            style = "s" if row["kind"] == "rl" else "^"
            ax.errorbar(
                row["flops_reduction_pct"],
                row["delta_ppl_pct"],
                xerr=row["flops_reduction_pct_std"] or None,
                yerr=row["delta_ppl_pct_std"] or None,
                fmt=style,
                capsize=3,
                label=row["policy"],
            )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("executed attention-FLOPs reduction (%)")
        ax.set_ylabel("perplexity increase vs full rank (%)")
        ax.set_title(f"method = {method}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

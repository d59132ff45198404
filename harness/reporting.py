"""Tables and plots from leaderboard rows: summaries over windows and seeds, Pareto plots.

Every number here is computed from the per-window CSV rows of
:func:`agents.evaluation.evaluate_policy_on_windows`; the Markdown table is generated from
the summary frame, never typed. :func:`pareto_front` marks the non-dominated points of a
frame, :func:`front_plot` draws a baseline front with agents on the same axes, and
:func:`markdown_from_frame` renders any frame read back from a CSV, with the columns
:func:`table_columns` names (one header and format per quantity, :data:`COLUMN_STYLES`).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    *(
        f"{q}{suffix}"
        for q in ("mean_kl", "top1_agreement", "retrieval_accuracy")
        for suffix in ("", "_low", "_high")
    ),
    "retrieval_windows",
    "reference",
    "kl_vs_reference",
    "kl_vs_reference_low",
    "kl_vs_reference_high",
    "verdict",
)
QUALITY = {
    "mean_kl": "mean_kl",
    "top1_agreement": "top1_agreement",
    "retrieval_accuracy": "retrieval_correct",
}
"""Summary column -> per-window column of the live quality measurements."""
REFERENCE_POLICIES = ("static_allocation",)
"""The policy each row's KL is paired against, the first present in a method's rows."""


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


def window_groups(env, n_windows: int) -> np.ndarray:
    """The text group of each of ``env``'s first ``n_windows`` windows (its corpus's
    :meth:`~drrl_env.data.sources.Source.text_groups`): windows that share text (a mix's
    passkey window and the prose it is written into, the needles of one filler window) are
    resampled together by the intervals."""
    from drrl_env.data import resolve_source

    config = env.unwrapped.config
    return resolve_source(config.corpus, config.data_path, config.text_field).text_groups(n_windows)


def quality_table(
    frame: pd.DataFrame, reference: str | None = None, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """Per (method, policy, kind): live quality with 95 % bootstrap intervals over windows.

    Each window's value is its mean over seeds. ``groups`` (one label per window index,
    :func:`window_groups`) resamples windows that share text together; None: every window
    apart. Columns: ``mean_kl``, ``top1_agreement``
    and ``retrieval_accuracy`` (windows that expect an answer; ``retrieval_windows`` counts
    them), each with ``_low``/``_high``; and, when ``reference`` (default: the first of
    :data:`REFERENCE_POLICIES` among the method's policies) is present, the mean paired
    difference of KL against it on the same windows (``kl_vs_reference`` with its interval)
    and its ``verdict`` ("lower KL", "higher KL" or "no difference"). NaN where the rows hold
    no live measurement (cached evaluation, or runs from before it existed).
    """
    from harness.statistics import mean_interval, paired_difference, window_labels

    keys = ["method", "policy", "kind"]
    present = [column for column in QUALITY.values() if column in frame]
    windows = frame.groupby([*keys, "window"], sort=False)[present].mean().reset_index()
    rows = []
    for method, part in windows.groupby("method", sort=False):
        chosen = reference
        if chosen is None:
            chosen = next((p for p in REFERENCE_POLICIES if p in set(part["policy"])), None)
        base = part[part["policy"] == chosen].set_index("window")
        for (policy, kind), group in part.groupby(["policy", "kind"], sort=False):
            row: dict = {"method": method, "policy": policy, "kind": kind}
            for name, column in QUALITY.items():
                values = group[column].dropna() if column in group else pd.Series(dtype=float)
                labels = window_labels(groups, group.loc[values.index, "window"])
                interval = mean_interval(values, groups=labels) if len(values) else None
                row[name] = interval.estimate if interval else np.nan
                row[f"{name}_low"] = interval.low if interval else np.nan
                row[f"{name}_high"] = interval.high if interval else np.nan
                if name == "retrieval_accuracy":
                    row["retrieval_windows"] = len(values)
            row["reference"] = chosen
            row.update(kl_vs_reference=np.nan, kl_vs_reference_low=np.nan)
            row.update(kl_vs_reference_high=np.nan, verdict=None)
            if chosen is not None and policy != chosen and "mean_kl" in group:
                own = group.set_index("window")["mean_kl"].dropna()
                shared = own.index.intersection(base["mean_kl"].dropna().index)
                if len(shared):
                    diff = paired_difference(
                        own[shared],
                        base.loc[shared, "mean_kl"],
                        groups=window_labels(groups, shared),
                    )
                    row.update(
                        kl_vs_reference=diff.estimate,
                        kl_vs_reference_low=diff.low,
                        kl_vs_reference_high=diff.high,
                        verdict=diff.verdict("lower KL", "higher KL"),
                    )
            rows.append(row)
    return pd.DataFrame(rows)


def summary_table(frame: pd.DataFrame, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Per (method, policy): means and standard deviations over seeds, and the live quality
    with intervals over windows (:func:`quality_table`; ``groups`` as there)."""
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
    table = table.merge(
        quality_table(frame, groups=groups), on=["method", "policy", "kind"], how="left"
    )
    return table[list(SUMMARY_COLUMNS)]


def _cell(value: float, std: float | None, digits: int) -> str:
    if std is None or not np.isfinite(std) or std == 0:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def interval_cell(row: pd.Series, name: str, scientific: bool = False) -> str:
    """``row[name]`` with its 95 % interval (``<name>_low``, ``<name>_high``), or ``n/a``."""
    from harness.statistics import Interval

    value = row.get(name)
    if value is None or not np.isfinite(value):
        return "n/a"
    low, high = row.get(f"{name}_low", np.nan), row.get(f"{name}_high", np.nan)
    if not (np.isfinite(low) and np.isfinite(high)):  # no interval (fewer than 2 samples)
        return f"{value:{'.2e' if scientific else '.3g'}}"
    return Interval(float(value), float(low), float(high), 2).format(scientific=scientific)


QUALITY_CELLS = (
    ("mean_kl_interval", "mean_kl", True),
    ("top1_interval", "top1_agreement", False),
)
"""``(text column, value column, scientific)`` of token KL and top-1 agreement with intervals."""


def with_interval_cells(
    frame: pd.DataFrame, cells: Sequence[tuple[str, str, bool]] = QUALITY_CELLS
) -> pd.DataFrame:
    """``frame`` with one text column per ``(column, name, scientific)`` of ``cells``: each
    row's ``name`` with its 95 % interval (:func:`interval_cell`)."""
    rows = [row for _, row in frame.iterrows()]
    return frame.assign(
        **{column: [interval_cell(row, name, sci) for row in rows] for column, name, sci in cells}
    )


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table (one per method, stacked).

    When the rows hold live quality (token KL), the table adds token KL, top-1 agreement
    and retrieval accuracy with their 95 % intervals over windows, and the paired KL
    difference against the reference policy with its verdict.
    """
    quality = "mean_kl" in summary and summary["mean_kl"].notna().any()
    header = (
        "| method | policy | perplexity | Δ ppl vs full | attention GFLOPs executed "
        "| FLOPs reduction | fidelity | mean rank | return | seeds × windows |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    if quality:
        header += " token KL | top-1 | retrieval | KL − reference | verdict |"
        rule += "---|---|---|---|---|"
    rows = [header + "\n" + rule]
    for _, row in summary.iterrows():
        line = (
            f"| {row['method']} | {row['policy']} "
            f"| {_cell(row['perplexity'], row['perplexity_std'], 2)} "
            f"| {_cell(row['delta_ppl_pct'], row['delta_ppl_pct_std'], 1)} % "
            f"| {row['attention_gflops']:.2f} "
            f"| {_cell(row['flops_reduction_pct'], row['flops_reduction_pct_std'], 1)} % "
            f"| {row['mean_fidelity']:.3f} | {row['mean_rank']:.1f} | {row['return']:.2f} "
            f"| {row['seeds']} × {row['windows']} |"
        )
        if quality:
            verdict = row.get("verdict")
            reference = row.get("reference")
            versus = interval_cell(row, "kl_vs_reference", scientific=True)
            if versus != "n/a" and isinstance(reference, str):
                versus = f"{versus} (vs {reference})"
            line += (
                f" {interval_cell(row, 'mean_kl', scientific=True)} "
                f"| {interval_cell(row, 'top1_agreement')} "
                f"| {interval_cell(row, 'retrieval_accuracy')} "
                f"| {versus} | {verdict if isinstance(verdict, str) else 'n/a'} |"
            )
        rows.append(line)
    return "\n".join(rows)


def write_markdown(summary: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown_table(summary) + "\n")
    return path


SYMLOG_ABOVE_PCT = 10.0
"""Perplexity changes beyond this many percent put the Pareto plot's y axis on symlog."""
TARGET_BAND_PCT = 1.0
"""The perplexity increase marked on the Pareto plot: the band a useful policy stays in."""


def ppl_axis_scale(delta_ppl_pct: pd.Series) -> str:
    """``symlog`` when perplexity changes span more than :data:`SYMLOG_ABOVE_PCT`, else linear.

    A symlog axis keeps +1 % and +900 % readable on one plot; when every change is small
    (a tiny model, near-full ranks) its linear region would hold all points with odd ticks.
    """
    return "symlog" if float(delta_ppl_pct.abs().max()) > SYMLOG_ABOVE_PCT else "linear"


def ppl_axes(ax, delta_ppl_pct: pd.Series) -> None:
    """Labels the FLOPs-reduction / perplexity-increase axes, scales y, marks the +1 % band."""
    if ppl_axis_scale(delta_ppl_pct) == "symlog":
        ax.set_yscale("symlog", linthresh=1.0)
    if float(delta_ppl_pct.max()) > TARGET_BAND_PCT:
        ax.axhline(TARGET_BAND_PCT, color="black", linestyle=":", linewidth=0.8)
        ax.annotate(
            f"+{TARGET_BAND_PCT:g} % perplexity",
            (1.0, TARGET_BAND_PCT),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7,
        )
    ax.set_xlabel("executed attention-FLOPs reduction (%)")
    ax.set_ylabel("perplexity increase vs full rank (%)")


def pareto_plot(summary: pd.DataFrame, path: str | Path) -> Path:
    """Executed attention-FLOPs reduction vs perplexity increase, one panel per method."""
    plt = pyplot()

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
        ppl_axes(ax, part["delta_ppl_pct"])
        ax.set_title(f"method = {method}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def pareto_front(
    frame: pd.DataFrame,
    x: str,
    y: str,
    maximize_x: bool = True,
    minimize_y: bool = True,
) -> pd.Series:
    """Which rows are non-dominated in the ``(x, y)`` plane.

    A row is dominated when another row is at least as good on both axes and strictly better
    on one. Identical points do not dominate each other; a row with NaN on either axis is
    never on the front and dominates nothing.

    Args:
        frame: One row per point.
        x: The column of the first objective (by default larger is better, e.g. the
            FLOPs reduction).
        y: The column of the second objective (by default smaller is better, e.g. the
            perplexity increase).
        maximize_x: Larger ``x`` is better; False: smaller is better.
        minimize_y: Smaller ``y`` is better; False: larger is better.

    Returns:
        A boolean Series on ``frame``'s index, True for the non-dominated rows.
    """
    gain_x = frame[x].to_numpy(dtype=float) * (1.0 if maximize_x else -1.0)
    gain_y = frame[y].to_numpy(dtype=float) * (-1.0 if minimize_y else 1.0)
    valid = np.isfinite(gain_x) & np.isfinite(gain_y)
    px, py = gain_x[valid], gain_y[valid]
    no_worse = (px[None, :] >= px[:, None]) & (py[None, :] >= py[:, None])  # [i, j]: j vs i
    better = (px[None, :] > px[:, None]) | (py[None, :] > py[:, None])
    dominated = np.any(no_worse & better, axis=1)
    front = np.zeros(len(frame), dtype=bool)
    front[np.flatnonzero(valid)[~dominated]] = True
    return pd.Series(front, index=frame.index, name="pareto")


def undominated_by(
    frame: pd.DataFrame, reference: pd.Series, x: str, y: str, **directions: bool
) -> pd.Series:
    """Per row: no row of the ``reference`` subset dominates it (see :func:`pareto_front`).

    For a reference row this is its membership in the reference subset's own front; for
    any other row, whether it lies beyond (or on) that front.

    Args:
        frame: One row per point.
        reference: Boolean Series on ``frame``'s index selecting the reference rows (e.g. the
            static-rank and energy-threshold baselines).
        x, y: The objective columns.
        **directions: ``maximize_x`` / ``minimize_y`` of :func:`pareto_front`.
    """
    base = frame[reference]
    result = pd.Series(False, index=frame.index, name="undominated")
    result[base.index] = pareto_front(base, x, y, **directions)
    for index in frame.index[~reference.to_numpy(dtype=bool)]:
        subset = pd.concat([base, frame.loc[[index]]], ignore_index=True)
        result[index] = bool(pareto_front(subset, x, y, **directions).iloc[-1])
    return result


Column = tuple[str, str, str]
"""``(header, CSV column, format)`` of a Markdown table; ``format`` is a ``str.format``
pattern such as ``"{:.2f}"``."""

COLUMN_STYLES: dict[str, tuple[str, str]] = {
    "kind": ("kind", "{}"),
    "family": ("family", "{}"),
    "policy": ("policy", "{}"),
    "budget": ("budget", "{:g}"),
    "beta": ("beta", "{:g}"),
    "gamma": ("gamma", "{:g}"),
    "rank": ("rank", "{}"),
    "seeds": ("seeds", "{}"),
    "windows": ("windows", "{}"),
    "threads": ("threads", "{}"),
    "mean_kl": ("mean token KL", "{}"),
    "kl_vs_static": ("KL − static_layer", "{}"),
    "verdict": ("verdict", "{}"),
    "top1_agreement": ("top-1 agreement", "{}"),
    "retrieval_correct": ("retrieval", "{}"),
    "retrieval_vs_exact": ("retrieval − exact", "{}"),
    "retrieval_vs_static": ("retrieval − static_layer", "{}"),
    "perplexity": ("perplexity", "{:.2f}"),
    "delta_ppl_pct": ("Δ ppl vs full", "{:+.2f} %"),
    "delta_ppl_pct_std": ("± (seeds)", "{:.2f}"),
    "flops_reduction_pct": ("FLOPs reduction", "{:.1f} %"),
    "flops_reduction_pct_std": ("± (seeds)", "{:.1f}"),
    "flops_ratio": ("FLOPs / exact (live)", "{}"),
    "mean_rank": ("mean rank", "{:.1f}"),
    "mean_fidelity": ("fidelity", "{:.4f}"),
    "mean_fidelity_std": ("± (seeds)", "{:.4f}"),
    "mean_perturbation": ("perturbation", "{:.3f}"),
    "return": ("return", "{:.2f}"),
    "kl_vs_cell": ("KL − static_cell", "{}"),
    "verdict_vs_cell": ("verdict", "{}"),
    "masked_actions": ("replaced actions", "{}"),
    "attention_gflops": ("attention GFLOPs", "{:.3f}"),
    "pareto": ("non-dominated", "{}"),
    "undominated_by_baselines": ("beyond baselines", "{}"),
    "size": ("seeds × windows", "{}"),
    "distinct_ranks": ("distinct ranks", "{}"),
    "terms": ("reward terms", "{}"),
    "schedules": ("schedules", "{}"),
    "spearman": ("Spearman ρ vs Δlog-ppl", "{:.3f}"),
    "pearson": ("Pearson r vs Δlog-ppl", "{:.3f}"),
    "spearman_kl": ("Spearman ρ vs KL", "{:.3f}"),
    "pearson_kl": ("Pearson r vs KL", "{:.3f}"),
    "env_id": ("env", "{}"),
    "reward_max_rel": ("reward max rel", "{:.2e}"),
    "reward_max_abs": ("reward max abs", "{:.2e}"),
    "perplexity_rel": ("perplexity rel", "{:.2e}"),
    "L": ("L", "{}"),
    "kernel": ("kernel", "{}"),
    "time_ms": ("time (ms)", "{:.3f}"),
    "time_vs_sdpa": ("time / SDPA", "{:.2f}"),
    "time_vs_eager": ("time / eager", "{:.2f}"),
    "gflops": ("GFLOPs", "{:.3f}"),
    "ceiling_ratio": ("ceiling", "{:.3f}"),
    "mean_kl_interval": ("token KL", "{}"),
    "top1_interval": ("top-1", "{}"),
    "kl_vs_reference_interval": ("KL − static_allocation", "{}"),
}
"""CSV column -> ``(header, format)`` of every column the experiment tables write: the same
quantity has the same header and format in each table, unless the table overrides it (the
FLOPs ratio of a live episode and of one kernel call are different quantities)."""


def table_columns(names: str, **overrides: tuple[str, str]) -> tuple[Column, ...]:
    """The columns of a Markdown table, in order, by CSV column name.

    Args:
        names: CSV columns separated by spaces, in the table's order.
        overrides: ``column=(header, format)`` for a column this table writes differently
            from :data:`COLUMN_STYLES` or that is not in it.

    Raises:
        ValueError: A column with no style here nor in ``overrides``, a repeated column, or
            an override of a column not in ``names``.
    """
    columns = names.split()
    if len(set(columns)) != len(columns):
        raise ValueError(f"table_columns: repeated column in {names!r}")
    unused = set(overrides) - set(columns)
    if unused:
        raise ValueError(f"table_columns: overrides of columns not in the table: {sorted(unused)}")
    table = []
    for column in columns:
        style = overrides.get(column, COLUMN_STYLES.get(column))
        if style is None:
            raise ValueError(f"table_columns: no header and format for column {column!r}")
        header, pattern = style
        table.append((header, column, pattern))
    return tuple(table)


def markdown_from_frame(frame: pd.DataFrame, columns: Sequence[Column]) -> str:
    """A Markdown table of ``frame``, one row per row, columns chosen and formatted.

    Args:
        frame: The rows (typically read back from the CSV the table documents).
        columns: ``(header, column, format)`` triples; ``format`` is a ``str.format``
            pattern such as ``"{:.2f}"``. NaN and empty cells are written as ``n/a``.
    """
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in frame.iterrows():
        cells = [_format_cell(row[column], pattern) for _, column, pattern in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_cell(value: object, pattern: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, str) and not value:
        return "n/a"
    return pattern.format(value)


FRONT_FAMILIES = ("static", "energy", "rl")
"""Families of points on a front plot: static ranks (and full rank), energy thresholds, agents."""


def front_plot(front: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Executed-FLOPs reduction vs perplexity increase: the baseline front and the agents.

    Args:
        front: Rows with ``family`` (one of :data:`FRONT_FAMILIES`), ``policy``, ``label``,
            ``flops_reduction_pct``, ``delta_ppl_pct``, their ``_std`` columns and the
            boolean ``pareto``.
        path: The PNG written.
        title: The plot title.

    The static ranks (full rank included) are joined by a line, the energy thresholds by a
    dashed one; agents are squares with their standard deviation over seeds; the
    non-dominated points of all rows are ringed.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"static": ("o-", "grey", "static ranks"), "energy": ("^--", "tab:blue", "energy")}
    for family, (fmt, color, name) in styles.items():
        part = front[front["family"] == family].sort_values("flops_reduction_pct")
        if part.empty:
            continue
        ax.plot(part["flops_reduction_pct"], part["delta_ppl_pct"], fmt, color=color, label=name)
        for _, row in part.iterrows():
            ax.annotate(
                str(row["label"]),
                (row["flops_reduction_pct"], row["delta_ppl_pct"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    for _, row in front[front["family"] == "rl"].iterrows():
        ax.errorbar(
            row["flops_reduction_pct"],
            row["delta_ppl_pct"],
            xerr=_error(row.get("flops_reduction_pct_std")),
            yerr=_error(row.get("delta_ppl_pct_std")),
            fmt="s",
            capsize=3,
            label=str(row["policy"]),
        )
    best = front[front["pareto"].astype(bool)]
    ax.scatter(
        best["flops_reduction_pct"],
        best["delta_ppl_pct"],
        s=160,
        facecolors="none",
        edgecolors="tab:red",
        linewidths=1.5,
        label="non-dominated",
        zorder=3,
    )
    ppl_axes(ax, front["delta_ppl_pct"])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _error(value: object) -> float | None:
    """An error-bar half width, None when missing, NaN or zero."""
    if value is None or not np.isfinite(float(value)) or float(value) == 0:
        return None
    return float(value)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (120 dpi) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

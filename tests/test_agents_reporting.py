"""Pareto fronts, the front plot and Markdown tables rendered from frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness.reporting import (
    front_plot,
    markdown_from_frame,
    pareto_front,
    ppl_axis_scale,
    table_columns,
    undominated_by,
)


def _points(pairs: list[tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["saving", "loss"])


def test_pareto_front_marks_the_non_dominated_points():
    frame = _points([(0, 0), (10, 5), (20, 50), (15, 60), (5, 10), (20, 40)])
    front = pareto_front(frame, "saving", "loss")
    # (15, 60) is dominated by (20, 40); (5, 10) by (10, 5); (20, 50) by (20, 40).
    assert front.tolist() == [True, True, False, False, False, True]
    assert front.dtype == bool


def test_pareto_front_keeps_ties_and_drops_nan():
    frame = _points([(10, 5), (10, 5), (math.nan, 0), (0, math.nan), (0, 0)])
    assert pareto_front(frame, "saving", "loss").tolist() == [True, True, False, False, True]


def test_pareto_front_directions_and_index():
    frame = _points([(1, 1), (2, 2), (3, 0)]).set_index(pd.Index([7, 3, 5]))
    assert pareto_front(frame, "saving", "loss").to_dict() == {7: False, 3: False, 5: True}
    both_small = pareto_front(frame, "saving", "loss", maximize_x=False)
    assert both_small.to_dict() == {7: True, 3: False, 5: True}
    both_large = pareto_front(frame, "saving", "loss", minimize_y=False)
    assert both_large.to_dict() == {7: False, 3: True, 5: True}


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    frame = _points([tuple(p) for p in rng.integers(0, 6, size=(40, 2)).tolist()])
    front = pareto_front(frame, "saving", "loss")
    for i, (x, y) in enumerate(frame.itertuples(index=False)):
        beaten = any(
            (x2 >= x and y2 <= y) and (x2 > x or y2 < y) for x2, y2 in frame.itertuples(index=False)
        )
        assert front.iloc[i] == (not beaten)


def test_pareto_front_of_empty_frame():
    assert pareto_front(_points([]), "saving", "loss").empty


def test_undominated_by_judges_each_point_against_the_reference_only():
    frame = _points([(0, 0), (20, 40), (10, 5), (30, 30), (10, 50)])
    reference = pd.Series([True, True, False, False, False])
    result = undominated_by(frame, reference, "saving", "loss")
    # (10, 5) and (30, 30) are beyond the reference front, (10, 50) is behind (20, 40).
    assert result.tolist() == [True, True, True, True, False]


def test_markdown_from_frame_formats_and_marks_missing_cells():
    frame = pd.DataFrame({"name": ["a", "b"], "value": [1.2345, math.nan], "flag": [True, False]})
    table = markdown_from_frame(
        frame, [("policy", "name", "{}"), ("v", "value", "{:.2f}"), ("front", "flag", "{}")]
    )
    assert table.splitlines() == [
        "| policy | v | front |",
        "|---|---|---|",
        "| a | 1.23 | True |",
        "| b | n/a | False |",
    ]


def test_table_columns_take_the_shared_styles_unless_overridden():
    columns = table_columns("policy mean_kl delta_ppl_pct size", size=("n", "{:d}"))
    assert columns == (
        ("policy", "policy", "{}"),
        ("mean token KL", "mean_kl", "{}"),
        ("Δ ppl vs full", "delta_ppl_pct", "{:+.2f} %"),
        ("n", "size", "{:d}"),
    )
    frame = pd.DataFrame(
        {"policy": ["a"], "mean_kl": ["1e-3"], "delta_ppl_pct": [0.5], "size": [3]}
    )
    assert markdown_from_frame(frame, columns).splitlines()[2] == "| a | 1e-3 | +0.50 % | 3 |"
    # the same quantity reads the same in every table that names it
    assert table_columns("budget")[0] == ("budget", "budget", "{:g}")


@pytest.mark.parametrize(
    ("names", "overrides", "message"),
    [
        ("policy no_such_column", {}, "no header and format for column 'no_such_column'"),
        ("policy policy", {}, "repeated column"),
        ("policy", {"windows": ("n", "{}")}, "columns not in the table: ['windows']"),
    ],
)
def test_table_columns_refuse_unknown_repeated_and_stray_columns(names, overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        table_columns(names, **overrides)


def test_front_plot_writes_a_png(tmp_path):
    front = pd.DataFrame(
        {
            "family": ["static", "static", "energy", "rl"],
            "policy": ["full_rank", "static_32", "energy_0.9", "ppo_mlp"],
            "label": ["64", "32", "0.9", "ppo_mlp"],
            "flops_reduction_pct": [0.0, 10.0, 5.0, 8.0],
            "flops_reduction_pct_std": [0.0, 0.0, 0.0, 1.0],
            "delta_ppl_pct": [0.0, 20.0, 3.0, 4.0],
            "delta_ppl_pct_std": [0.0, 0.0, 0.0, math.nan],
            "pareto": [True, True, True, True],
        }
    )
    path = front_plot(front, tmp_path / "front.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("pairs", [[(1, 1)], [(1, 1), (1, 1)]])
def test_single_and_duplicate_points_are_on_the_front(pairs):
    assert pareto_front(_points(pairs), "saving", "loss").all()


@pytest.mark.parametrize(
    ("changes", "scale"),
    [
        ([0.0, -0.33, 0.13], "linear"),  # all inside +-10 %: a plain axis
        ([0.0, 1.2, 9.9], "linear"),
        ([0.0, 0.6, 90.1], "symlog"),  # +0.6 % and +90 % on one axis
        ([0.0, -12.0], "symlog"),
    ],
)
def test_ppl_axis_is_symlog_only_for_wide_spans(changes, scale):
    assert ppl_axis_scale(pd.Series(changes)) == scale


def test_quality_table_pairs_windows_against_the_reference():
    from harness.reporting import markdown_table, quality_table, summary_table

    rng = np.random.default_rng(0)
    rows = []
    for window in range(8):
        hard = rng.uniform(0.001, 0.05)  # windows differ far more than the policies
        for policy, kind, extra in (
            ("static_allocation", "baseline", 0.0),
            ("ppo_mlp", "rl", 0.002),
            ("same", "baseline", 0.0),
        ):
            for seed in (0, 1) if kind == "rl" else (0,):
                rows.append(
                    {
                        "method": "topp",
                        "policy": policy,
                        "kind": kind,
                        "seed": seed,
                        "window": window,
                        "mean_kl": hard + extra + (1e-9 * seed if policy == "same" else 0),
                        "top1_agreement": 0.9,
                        "retrieval_correct": float(window % 2) if window < 4 else np.nan,
                    }
                )
    frame = pd.DataFrame(rows)
    table = quality_table(frame).set_index("policy")
    assert (table["reference"] == "static_allocation").all()
    ppo = table.loc["ppo_mlp"]
    assert ppo["kl_vs_reference"] == pytest.approx(0.002)
    assert ppo["kl_vs_reference_low"] == pytest.approx(0.002)  # the same shift on every window
    assert ppo["verdict"] == "higher KL"
    assert table.loc["same", "verdict"] == "no difference"
    assert np.isnan(table.loc["static_allocation", "kl_vs_reference"])
    assert table.loc["ppo_mlp", "retrieval_windows"] == 4
    assert table.loc["ppo_mlp", "retrieval_accuracy"] == pytest.approx(0.5)
    means = frame.groupby(["policy", "window"])["mean_kl"].mean().groupby("policy").mean()
    assert table.loc["ppo_mlp", "mean_kl"] == pytest.approx(means["ppo_mlp"])
    low, high = table.loc["ppo_mlp", ["mean_kl_low", "mean_kl_high"]]
    assert low < table.loc["ppo_mlp", "mean_kl"] < high
    # without live measurements the quality columns stay empty and the table keeps its shape
    cached = frame.drop(columns=["mean_kl", "top1_agreement", "retrieval_correct"])
    assert quality_table(cached)["mean_kl"].isna().all()
    full = frame.assign(
        perplexity=20.0,
        perplexity_full=19.0,
        flops_reduction=0.5,
        attention_flops_full=1e9,
        mean_fidelity=0.99,
        mean_rank=16.0,
        **{"return": 1.0},
    )
    summary = summary_table(full)
    text = markdown_table(summary)
    assert "| token KL | top-1 | retrieval | KL − reference | verdict |" in text
    assert "higher KL" in text and "(vs static_allocation)" in text
    assert "token KL" not in markdown_table(summary.assign(mean_kl=np.nan))


def test_quality_table_resamples_windows_that_share_text_together():
    # windows 2k and 2k + 1 share their text (here: identical values): grouped, the table's
    # intervals are those of the 4 distinct windows, not the narrower ones of 8 "independent"
    from harness.reporting import quality_table

    rng = np.random.default_rng(3)
    hard, extra = rng.uniform(0.001, 0.05, size=4), rng.normal(0.002, 0.003, size=4)

    def frame(copies: int) -> pd.DataFrame:
        rows = [
            {"method": "topp", "policy": policy, "kind": "rl", "seed": 0, "window": w,
             "mean_kl": hard[w // copies] + shift[w // copies], "top1_agreement": 0.9}
            for policy, shift in (("static_allocation", np.zeros(4)), ("ppo_mlp", extra))
            for w in range(4 * copies)
        ]  # fmt: skip
        return pd.DataFrame(rows)

    columns = ["mean_kl", "mean_kl_low", "mean_kl_high", "kl_vs_reference_low"]
    distinct = quality_table(frame(1)).set_index("policy")[columns]
    paired = quality_table(frame(2), groups=np.arange(8) // 2).set_index("policy")[columns]
    naive = quality_table(frame(2)).set_index("policy")[columns]
    pd.testing.assert_frame_equal(paired, distinct)

    def width(table: pd.DataFrame) -> pd.Series:
        return table["mean_kl_high"] - table["mean_kl_low"]

    assert (width(naive) < width(paired)).all()
    with pytest.raises(ValueError, match="not all among the 4 labelled"):
        quality_table(frame(2), groups=np.arange(4))

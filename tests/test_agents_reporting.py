"""Pareto fronts, the front plot and Markdown tables rendered from frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agents.reporting import (
    front_plot,
    markdown_from_frame,
    pareto_front,
    ppl_axis_scale,
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

"""Filter-and-retrain curves and reference levels."""
import numpy as np
import pandas as pd
import pytest

from cinf_core.views.retrain import reference_levels, retrain_curves, y_range


def test_retrain_curves_and_references():
    rows = [{"experiment_id": "e", "trait": "evil", "method": "base", "mode": "none",
             "fraction": 1.0, "seed": 0, "trait_score": 5.0, "capability": 60.0,
             "status": "complete"}]
    for seed in range(3):
        rows.append({"experiment_id": "e", "trait": "evil", "method": "all", "mode": "none",
                     "fraction": 0.0, "seed": seed, "trait_score": 70.0 + seed, "capability": 58.0,
                     "status": "complete"})
        rows.append({"experiment_id": "e", "trait": "evil", "method": "vector_filter",
                     "mode": "most", "fraction": 0.5, "seed": seed, "trait_score": 30.0 + 2 * seed,
                     "capability": 55.0, "status": "complete"})
    rows.append({**rows[-1], "seed": 9, "status": "running", "trait_score": None})
    cells = pd.DataFrame(rows)
    curves = retrain_curves(cells)
    assert list(curves["fraction"]) == [0.0, 0.5]
    assert curves["mean"].tolist() == pytest.approx([71.0, 32.0])
    assert curves["sem"].iloc[1] == pytest.approx(2.0 / np.sqrt(3))
    assert (curves["n"] == 3).all()
    refs = reference_levels(cells)
    assert refs == {"base model": 5.0, "fine-tuned on all data": pytest.approx(71.0)}
    assert retrain_curves(pd.DataFrame()).empty


def test_the_y_range_holds_every_line_with_a_margin():
    """A reference above every cell (the SmolLM2 world's base model, 29.9, over cells of 24-28)
    lies inside the range, not on its edge; so do the SEM bands, on both sides."""
    curves = pd.DataFrame({"mean": [27.6, 25.3, 24.9], "sem": [1.1, 0.1, np.nan]})
    refs = {"base model": 29.9, "fine-tuned on all data": 27.6}
    low, high = y_range(curves, refs)
    lines = [29.9, 27.6 + 1.1, 25.3 - 0.1, 24.9]
    assert low < min(lines) and high > max(lines)
    span = max(lines) - min(lines)
    assert high - 29.9 == pytest.approx(0.1 * span) and 24.9 - low == pytest.approx(0.1 * span)
    # a band reaching below a reference under every mean sets the bottom
    low, _ = y_range(pd.DataFrame({"mean": [50.0], "sem": [10.0]}), {"base model": 45.0})
    assert low == pytest.approx(40.0 - 0.1 * 20.0)
    # one level only: padded around it; nothing to plot: no range
    assert y_range(pd.DataFrame(columns=["mean", "sem"]), {"base model": 20.0}) == \
        pytest.approx([18.0, 22.0])
    assert y_range(pd.DataFrame(columns=["mean", "sem"]), {}) is None

"""Filter-and-retrain curves and reference levels."""
import numpy as np
import pandas as pd
import pytest

from cinf_core.views.retrain import reference_levels, retrain_curves


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

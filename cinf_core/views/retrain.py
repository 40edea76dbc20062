"""Filter-and-retrain results as the app draws them (Figure 2): trait score (or capability)
against the fraction removed, mean ± SEM over seeds, and the levels of the grid's reference cells
(the base model, the model retrained on all data)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..experiments.retrain import REFERENCE_CELLS

BASE_CELL, ALL_CELL = REFERENCE_CELLS


def retrain_curves(cells: pd.DataFrame, value: str = "trait_score") -> pd.DataFrame:
    """Mean ± SEM of ``value`` per method, mode and fraction over seeds.

    The "all" cells (0% removed) are every curve's starting point, so they are copied into each
    (method, mode). Returns ``experiment_id, trait, method, mode, fraction, mean, sem, n``.
    """
    cols = ["experiment_id", "trait", "method", "mode", "fraction", "mean", "sem", "n"]
    if cells is None or cells.empty:
        return pd.DataFrame(columns=cols)
    ok = cells[(cells["status"].fillna("complete") == "complete") & cells[value].notna()]
    start = ok[ok["method"] == ALL_CELL]
    rest = ok[~ok["method"].isin(REFERENCE_CELLS)]
    parts = [rest]
    for (exp, method, mode), _ in rest.groupby(["experiment_id", "method", "mode"]):
        parts.append(start[start["experiment_id"] == exp].assign(method=method, mode=mode,
                                                                 fraction=0.0))
    data = pd.concat(parts, ignore_index=True)
    if data.empty:
        return pd.DataFrame(columns=cols)
    grouped = data.groupby(["experiment_id", "trait", "method", "mode", "fraction"])[value]
    out = grouped.agg(mean="mean", n="count", std="std").reset_index()
    out["sem"] = (out["std"] / np.sqrt(out["n"])).fillna(0.0)
    return out[cols].sort_values(["method", "mode", "fraction"]).reset_index(drop=True)


def reference_levels(cells: pd.DataFrame, value: str = "trait_score") -> dict[str, float]:
    """Reference lines: the base model and the model fine-tuned on all data (mean over seeds)."""
    out: dict[str, float] = {}
    if cells is None or cells.empty:
        return out
    good = cells[cells[value].notna() & (cells["status"].fillna("complete") == "complete")]
    for method, name in ((BASE_CELL, "base model"), (ALL_CELL, "fine-tuned on all data")):
        part = good[good["method"] == method]
        if not part.empty:
            out[name] = float(part[value].mean())
    return out


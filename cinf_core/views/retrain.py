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



def y_range(curves: pd.DataFrame, refs: dict[str, float],
            margin: float = 0.1) -> list[float] | None:
    """``[low, high]`` of a y axis that shows every plotted line whole: each curve's mean ± SEM
    band and each reference level (so a reference above or below every cell does not sit on the
    axis edge), widened by ``margin`` of the span on each side (of the value itself, or 1, when
    everything lies on one level). None when there is nothing to plot."""
    values = list(refs.values())
    if curves is not None and not curves.empty:
        sem = curves["sem"].fillna(0.0)
        values += list(curves["mean"] - sem) + list(curves["mean"] + sem)
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = margin * (high - low) if high > low else margin * max(abs(high), 1.0)
    return [low - pad, high + pad]

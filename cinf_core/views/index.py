"""The gradient index as the app shows it: its state in one line, and Concept Influence of many
concepts (SAE features) split by data group, as Figure 4 draws it."""
from __future__ import annotations

from typing import Mapping

import pandas as pd


def index_caption(status: Mapping | None) -> str:
    """One line about the workspace's gradient index (``index_runs.index_status``)."""
    if not status:
        return "No gradient index yet."
    mib = status["matrix_bytes"] / 2**20
    if status["status"] != "complete":
        return (f"Gradient index being built: {status['n_done']} of {status['n_examples']} "
                f"training examples so far (k={status['dim']}, {mib:.0f} MiB when done).")
    stale = " Its model changed since: rebuild it." if status.get("stale") else ""
    return (f"Gradient index: {status['n_examples']} training examples, k={status['dim']}, "
            f"{status['bytes_per_example'] / 1024:.0f} KiB per example ({mib:.0f} MiB), built in "
            f"{status['build_s']:.0f} s.{stale}")


def group_influence(scored: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Each concept's Concept Influence summed over the training examples of each data group.

    ``scored``: ``{concept label: frame with score, data_origin}`` (a run's scored examples).
    Returns long ``concept, grp, influence, total, rank``: ``influence`` = sum of the scores of
    the group's examples (how much that group pushes the concept up on the test queries),
    ``total`` over groups, rank 1 = the largest total; the frame is sorted by rank, then group.
    """
    cols = ["concept", "grp", "influence", "total", "rank"]
    rows = []
    for label, frame in scored.items():
        if frame is None or frame.empty:
            continue
        groups = frame["data_origin"].fillna("unlabelled").astype(str)
        for grp, value in frame["score"].groupby(groups).sum().items():
            rows.append({"concept": label, "grp": grp, "influence": float(value)})
    out = pd.DataFrame(rows, columns=["concept", "grp", "influence"])
    if out.empty:
        return pd.DataFrame(columns=cols)
    totals = out.groupby("concept")["influence"].sum().sort_values(ascending=False)
    out["total"] = out["concept"].map(totals)
    out["rank"] = out["concept"].map({c: r for r, c in enumerate(totals.index, start=1)})
    return out.sort_values(["rank", "grp"])[cols].reset_index(drop=True)

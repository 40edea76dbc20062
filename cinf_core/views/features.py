"""SAE features as the app shows them (Figure 4): the top features' influence split by data group,
one feature under every method, the trait's share, and the features a search turns up."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from ..concepts.features import trait_share

# Figure 4's feature influence in LaTeX (concepts.features.FIG4_DEFINITION says it in words).
FEATURE_DEFINITION = (r"F_j^{g} = \sum_{i \in g} \mathrm{score}_i \, A_{ij}, \qquad "
                      r"A_{ij} = \text{mean activation of SAE feature } j \text{ over } z_i"
                      r"\text{'s response tokens}")


def top_feature_bars(attributions: pd.DataFrame, top_n: int = 15,
                     trait_label: str | None = None) -> pd.DataFrame:
    """Top features by total influence Σ_g F_j^g, long format for stacked bars.

    ``attributions``: ``feature, grp, influence`` (one run). Returns ``feature, grp, influence,
    total, rank`` for the ``top_n`` features, rank 1 = most influential; the trait group first.
    """
    cols = ["feature", "grp", "influence", "total", "rank"]
    if attributions is None or attributions.empty:
        return pd.DataFrame(columns=cols)
    totals = attributions.groupby("feature")["influence"].sum().sort_values(ascending=False)
    keep = totals.head(top_n)
    ranks = pd.Series(np.arange(1, len(keep) + 1), index=keep.index)
    out = attributions[attributions["feature"].isin(keep.index)].copy()
    out["total"] = out["feature"].map(keep)
    out["rank"] = out["feature"].map(ranks)
    out["_trait"] = out["grp"] != trait_label
    return out.sort_values(["rank", "_trait", "grp"])[cols].reset_index(drop=True)


def feature_detail(attributions_by_method: Mapping[str, pd.DataFrame],
                   feature: int) -> pd.DataFrame:
    """One feature under every method: ``method, grp, influence, rank, n_features``."""
    rows = []
    for method, frame in attributions_by_method.items():
        if frame is None or frame.empty:
            continue
        totals = frame.groupby("feature")["influence"].sum().sort_values(ascending=False)
        rank = (int(np.flatnonzero(totals.index.to_numpy() == feature)[0]) + 1
                if feature in totals.index else None)
        for _, r in frame[frame["feature"] == feature].iterrows():
            rows.append({"method": method, "grp": r["grp"], "influence": float(r["influence"]),
                         "rank": rank, "n_features": len(totals)})
    return pd.DataFrame(rows, columns=["method", "grp", "influence", "rank", "n_features"])


def feature_trait_share(top: pd.DataFrame, trait_label: str | None) -> float:
    """Share of the top features' influence from ``trait_label`` data, as the CLI reports it
    (``concepts.features.trait_share``: Σ_j F_j^trait / Σ_j Σ_g |F_j^g|).

    ``top``: long ``feature, grp, influence`` rows of the shown features (``top_feature_bars``).
    NaN when the trait group is absent or every influence is zero.
    """
    if top is None or top.empty or trait_label is None:
        return float("nan")
    wide = top.pivot_table(index="feature", columns="grp", values="influence", aggfunc="sum",
                           fill_value=0.0)
    wide.columns = [str(c) for c in wide.columns]
    return trait_share(wide.reset_index(), str(trait_label))


def sae_direction_choices(concepts: pd.DataFrame, layer: int) -> pd.DataFrame:
    """Direction concepts (persona vectors, probes, uploaded vectors) usable at an SAE's ``layer``:
    those built at that layer, then persona vectors of other layers (they store every layer).

    Returns ``concept_id, name, kind, layer, choice`` (``choice`` is the picker's text).
    """
    cols = ["concept_id", "name", "kind", "layer", "choice"]
    if concepts is None or concepts.empty:
        return pd.DataFrame(columns=cols)
    directions = concepts[concepts["kind"] != "sae_feature"]
    at_layer = directions["layer"] == layer
    other = directions[~at_layer & (directions["kind"] == "persona_vector")]
    out = pd.concat([directions[at_layer], other], ignore_index=True)
    out = out.assign(choice=[f"{r.name} ({r.kind.replace('_', ' ')}, layer {r.layer})"
                             if r.layer == layer else
                             f"{r.name} ({r.kind.replace('_', ' ')}, its layer-{layer} row)"
                             for r in out.itertuples()])
    return out[cols].reset_index(drop=True)


def feature_hits(hits: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """Search hits (``feature`` + score columns, in order) with each feature's ``label`` and
    ``density`` from the SAE's feature data (NaN where it has none yet)."""
    info = (features[["feature", "label", "density"]] if features is not None
            and not features.empty else pd.DataFrame(columns=["feature", "label", "density"]))
    info = info.astype({"feature": "int64"})
    out = hits.astype({"feature": "int64"}).merge(info, on="feature", how="left")
    scores = [c for c in hits.columns if c != "feature"]
    return out[["feature", "label", *scores, "density"]].reset_index(drop=True)


def feature_choices(attributions_by_method: Mapping[str, pd.DataFrame], features: pd.DataFrame,
                    top_n: int, trait_label: str | None = None, found: Iterable[int] = (),
                    query: str = "") -> tuple[list[int], int | None]:
    """The features a feature picker offers, and how many labels match ``query``.

    Without a query: the top ``top_n`` features by influence under each method (the ``top_n``
    most active ones while there are no attributions), plus ``found`` (search results), sorted.
    With a query (and feature data): the features whose label contains it, case-insensitive, at
    most 200. Returns ``(features, n_matching)``; ``n_matching`` is None when no query applied.
    """
    if query and features is not None and not features.empty:
        hits = features[features["label"].str.contains(query, case=False, regex=False, na=False)]
        return [int(j) for j in hits["feature"]][:200], len(hits)
    chosen = {int(j) for frame in attributions_by_method.values()
              for j in top_feature_bars(frame, top_n, trait_label)["feature"]}
    if not chosen and features is not None and not features.empty:
        chosen = {int(j) for j in features.nlargest(top_n, "max_act")["feature"]}
    return sorted(chosen | {int(j) for j in found}), None

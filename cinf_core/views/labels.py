"""Data labels (``data_origin``): which one marks the trait, their colours, their mix per
dataset."""
from __future__ import annotations

import json
from typing import Iterable

import pandas as pd

# Data labels get their own palette, sharing no colour with the methods' (nor with the theme's
# primary colour), so "from evil data" never reads as a method. The trait label is a deep crimson,
# normal-looking labels a neutral grey-blue, any other label a colour from Paul Tol's
# colour-blind-safe muted scheme.
LABEL_COLORS = {"trait": "#B2182B", "other": "#8DA0B8"}
_NORMAL_LABEL_COLORS = ["#8DA0B8", "#5E7690", "#C3CDDA"]
_OTHER_LABEL_COLORS = ["#332288", "#DDCC77", "#882255", "#44AA99", "#999933", "#AA4499"]

_NEGATIVE_LABELS = {"normal", "clean", "benign", "control", "neutral", "helpful", "base", "none",
                    "unlabelled", "other"}


def guess_trait_label(labels: Iterable[str | None]) -> str | None:
    """The data_origin value that most likely marks trait data (for AUC-PR and colours).

    Labels that read as "normal data" are skipped; among the rest the least frequent wins, since
    injected trait data is usually the minority.
    """
    counts = pd.Series([x for x in labels if x is not None], dtype="object").value_counts()
    candidates = [str(x) for x in counts.index if str(x).lower() not in _NEGATIVE_LABELS]
    if not candidates:
        return None
    return min(candidates, key=lambda x: (counts[x], x))


def label_colors(labels: Iterable[str], trait_label: str | None = None) -> dict[str, str]:
    """Trait label in the trait colour, normal-looking labels (normal, unlabelled, ...) in
    grey-blue, every other label in a calm palette; none of them is a method's colour."""
    out, k_normal, k_other = {}, 0, 0
    for label in sorted({str(x) for x in labels}):
        if label == trait_label:
            out[label] = LABEL_COLORS["trait"]
        elif label.lower() in _NEGATIVE_LABELS:
            out[label] = _NORMAL_LABEL_COLORS[k_normal % len(_NORMAL_LABEL_COLORS)]
            k_normal += 1
        else:
            out[label] = _OTHER_LABEL_COLORS[k_other % len(_OTHER_LABEL_COLORS)]
            k_other += 1
    return out


def label_mix(datasets: pd.DataFrame) -> pd.DataFrame:
    """Long frame ``dataset, label, count`` from the store's datasets table (label_counts JSON)."""
    rows = []
    for _, ds in datasets.iterrows():
        counts = ds["label_counts"]
        counts = json.loads(counts) if isinstance(counts, str) else (counts or {})
        for label, n in counts.items():
            rows.append({"dataset": ds["name"], "label": str(label), "count": int(n)})
    return pd.DataFrame(rows, columns=["dataset", "label", "count"])

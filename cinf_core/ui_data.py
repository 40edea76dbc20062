"""Plain data shaping for the app's pages: colours, labels, tables and chart-ready frames.

Everything here is importable without streamlit and unit-tested (tests/test_ui_data.py). Pages
read through the Store, call these helpers and draw; they hold no logic of their own. Frames that
come from the store are never mutated here (the app caches them and shares one copy).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import paths
from .method_keys import ANSWER_START_CI, FIGURE4_METHODS, method_key, split_method  # noqa: F401

# ---------------------------------------------------------------- methods: names, colours, formulas

METHOD_ORDER = ["concept_influence", "influence_function", "vector_filter",
                "projection_difference", "grad_sim", "lexical", "random"]
RETRAIN_METHODS = METHOD_ORDER[:1] + [ANSWER_START_CI] + METHOD_ORDER[1:]
"""What a filter-and-retrain experiment can rank by (method keys)."""
METHOD_LABELS = {
    "concept_influence": "Concept Influence",
    "influence_function": "Influence Function",
    "vector_filter": "Vector Filter",
    "projection_difference": "Projection Difference",
    "grad_sim": "Gradient similarity",
    "lexical": "Lexical (TF-IDF)",
    "random": "Random",
}
METHOD_SHORT = {
    "concept_influence": "CI", "influence_function": "IF", "vector_filter": "VF",
    "projection_difference": "PD", "grad_sim": "GS", "lexical": "Lex",
    "random": "Random",
}
# One colour per method for every chart in the app (colour-blind-safe Okabe-Ito palette).
METHOD_COLORS = {
    "concept_influence": "#D55E00",
    "influence_function": "#0072B2",
    "vector_filter": "#009E73",
    "projection_difference": "#CC79A7",
    "grad_sim": "#E69F00",
    "lexical": "#56B4E9",
    "random": "#7F7F7F",
}
_EXTRA_COLORS = ["#F0E442", "#000000", "#8C564B", "#17BECF", "#BCBD22"]
# Data labels (data_origin) get their own palette, sharing no colour with the methods' (nor with
# the theme's primary colour), so "from evil data" never reads as a method. The trait label is a
# deep crimson, normal-looking labels a neutral grey-blue, any other label a colour from Paul Tol's
# colour-blind-safe muted scheme.
LABEL_COLORS = {"trait": "#B2182B", "other": "#8DA0B8"}
_NORMAL_LABEL_COLORS = ["#8DA0B8", "#5E7690", "#C3CDDA"]
_OTHER_LABEL_COLORS = ["#332288", "#DDCC77", "#882255", "#44AA99", "#999933", "#AA4499"]

METHOD_FORMULAS = {
    "influence_function": (r"\mathrm{IF}(z_i) = \nabla_\theta L_{\text{test}}^\top\,"
                           r"(H+\lambda I)^{-1}\,\nabla_\theta L(z_i)"),
    "concept_influence": (r"\mathrm{CI}(z_i) = -\nabla_\theta f_c^\top\,(H+\lambda I)^{-1}\,"
                          r"\nabla_\theta L(z_i),\quad f_c = \bar a_l\cdot\hat v"),
    "vector_filter": r"\mathrm{VF}(z_i) = \bar a_l(x_i, y_i)\cdot \hat v",
    "projection_difference": (r"\mathrm{PD}(z_i) = \big[\bar a_l(x_i, y_i) - "
                              r"\bar a_l(x_i, y'_i)\big]\cdot\hat v"),
    "grad_sim": r"\mathrm{GS}(z_i) = \nabla_\theta L_{\text{test}}^\top\,\nabla_\theta L(z_i)",
    "lexical": (r"\mathrm{Lex}(z_i) = \cos\big(\mathrm{tfidf}(y_i),\ "
                r"\tfrac{1}{Q}\textstyle\sum_q \mathrm{tfidf}(y_q)\big)"),
    "random": r"s_i \sim \mathcal{N}(0, 1)",
}
METHOD_EXPLANATIONS = {
    "influence_function": "How much upweighting the example lowers the loss on the test queries "
                          "(the trait-expressing generations). Needs one gradient per example and "
                          "EK-FAC curvature H.",
    "concept_influence": "How much upweighting the example pushes the concept measurement f_c "
                         "(projection on the concept direction, or an SAE feature's "
                         "pre-activation) up on the test queries. EK-FAC only over blocks below "
                         "the concept layer l.",
    "vector_filter": "Projection of the example's response-mean activation on the concept "
                     "direction. One forward pass per example; no gradients, no Hessian.",
    "projection_difference": "How much more the training response expresses the concept than the "
                             "model's own response y' to the same prompt. Forward passes only.",
    "grad_sim": "Influence function with H = I: the dot product of test and training gradients.",
    "lexical": "Bag-of-words baseline: TF-IDF similarity of the training response to the test "
               "queries' responses. No model. If it retrieves the trait data as well as a method, "
               "the trait is in the words themselves.",
    "random": "A seeded random score per example: the baseline every method must beat.",
}
SIGN_CONVENTION = ("score > 0 means upweighting the example in training pushes the behaviour up; "
                   "rank 1 is the highest score; Remove Most drops the top.")
FEATURE_DEFINITION = (r"F_j^{g} = \sum_{i \in g} \mathrm{score}_i \, A_{ij}, \qquad "
                      r"A_{ij} = \text{mean activation of SAE feature } j \text{ over } z_i"
                      r"\text{'s response tokens}")


# Concept Influence measured over an answer-start window is its own entry in every view, under its
# method key ``concept_influence@start<K>`` (see cinf_core.method_keys).
WINDOW_COLOR = "#8C510A"
WINDOW_FORMULA = (r"\mathrm{CI}_K(z_i) = -\nabla_\theta f_c^\top\,(H+\lambda I)^{-1}\,"
                  r"\nabla_\theta L(z_i),\quad f_c = \tfrac{1}{|W|}\textstyle\sum_{t \in W} "
                  r"h_{l,t}\cdot\hat v,\ W = \{r_0-1, \dots, r_0+K-2\}")


def method_label(method: str) -> str:
    base, window = split_method(method)
    label = METHOD_LABELS.get(base, base.replace("_", " ").capitalize())
    return label if window is None else f"{label} (answer start, {window} tok)"


def score_flags(method: str) -> str:
    """The ``score`` command's flags that produce a run of this method key."""
    base, window = split_method(method)
    return f"--method {base}" + (f" --concept-window {window}" if window is not None else "")


def method_short(method: str) -> str:
    base, window = split_method(method)
    short = METHOD_SHORT.get(base, base)
    return short if window is None else f"{short}@{window}"


def method_color(method: str) -> str:
    """The method's colour; unknown methods get a stable colour from a spare palette."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    if split_method(method)[1] is not None:
        return WINDOW_COLOR
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def method_sort_key(method: str) -> tuple[int, int, str]:
    base, window = split_method(method)
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), window or 0,
            method)


def method_explanation(method: str) -> tuple[str, str] | None:
    """``(one-line explanation, LaTeX formula)`` of a method key, None for unknown methods."""
    base, window = split_method(method)
    if base not in METHOD_FORMULAS:
        return None
    if window is None:
        return METHOD_EXPLANATIONS[base], METHOD_FORMULAS[base]
    return (f"Concept Influence with f_c measured only where each test answer starts: the last "
            f"prompt token (r_0 is the first answer token) and the first {window - 1} answer "
            f"token(s), where the model commits to how it answers, instead of over the whole "
            f"teacher-forced answer.", WINDOW_FORMULA)


def color_map(methods: Iterable[str], by_label: bool = False) -> dict[str, str]:
    """``{method or its label: colour}`` for plotly's ``color_discrete_map``."""
    return {(method_label(m) if by_label else m): method_color(m) for m in methods}


# ---------------------------------------------------------------- labels

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
    """Trait label in the trait colour, normal-looking labels (normal, unlabelled, ...) in grey-blue,
    every other label in a calm palette; none of them is a method's colour."""
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


# ---------------------------------------------------------------- runs

def json_dict(value) -> dict:
    """A dict from a JSON text column (``{}`` for NULL, bad JSON or a non-object)."""
    if isinstance(value, dict):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {}
    try:
        out = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def run_trait(config: Mapping, concept_name: str | None = None) -> str:
    """The trait a run attributes: ``config['trait']``, else its concept's name, else '—'."""
    for key in ("trait", "concept", "concept_name"):
        value = config.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and value.get("name"):
            return str(value["name"])
    return concept_name if isinstance(concept_name, str) and concept_name else "—"


def runs_table(runs: pd.DataFrame, concepts: pd.DataFrame | None = None,
               datasets: pd.DataFrame | None = None) -> pd.DataFrame:
    """The runs with readable columns: trait, concept and dataset names, a one-line label."""
    cols = ["run_id", "method", "method_label", "trait", "concept", "dataset", "dataset_id",
            "model_id", "concept_id", "status", "n_done", "n_total", "wall_s", "examples_per_s",
            "started_at", "finished_at", "host", "config", "timings", "error", "label"]
    if runs is None or runs.empty:
        return pd.DataFrame(columns=cols)
    concept_names = ({} if concepts is None or concepts.empty
                     else dict(zip(concepts["concept_id"], concepts["name"])))
    dataset_names = ({} if datasets is None or datasets.empty
                     else dict(zip(datasets["dataset_id"], datasets["name"])))
    out = runs.copy()
    configs = [json_dict(c) for c in out["config"]]
    out["config"] = configs
    out["timings"] = [json_dict(t) for t in out["timings"]]
    names = [concept_names.get(c, c) if isinstance(c, str) else None for c in out["concept_id"]]
    out["concept"] = names
    out["trait"] = [run_trait(cfg, name) for cfg, name in zip(configs, names)]
    out["dataset"] = [dataset_names.get(d, d) for d in out["dataset_id"]]
    out["method"] = [method_key(m, cfg) for m, cfg in zip(out["method"], configs)]
    out["method_label"] = [method_label(m) for m in out["method"]]
    out["label"] = [f"{method_label(m)} · {t} · {d} · {r[:6]}"
                    for m, t, d, r in zip(out["method"], out["trait"], out["dataset"],
                                          out["run_id"])]
    out = out.assign(_order=[method_sort_key(m) for m in out["method"]])
    out = out.sort_values(["trait", "_order", "started_at"], kind="stable").drop(columns="_order")
    return out[cols].reset_index(drop=True)


def latest_complete_runs(table: pd.DataFrame, trait: str | None = None,
                         dataset_id: str | None = None) -> pd.DataFrame:
    """One complete run per method (the latest), optionally for one trait and dataset."""
    if table.empty:
        return table
    sel = table[table["status"] == "complete"]
    if trait is not None:
        sel = sel[sel["trait"] == trait]
    if dataset_id is not None:
        sel = sel[sel["dataset_id"] == dataset_id]
    sel = sel.sort_values("started_at").groupby("method", sort=False).tail(1)
    order = [method_sort_key(m) for m in sel["method"]]
    return sel.assign(_o=order).sort_values("_o").drop(columns="_o")


# ---------------------------------------------------------------- scores and examples

def top_bottom(scored: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-k (highest score) and bottom-k rows of a ``scored_examples`` frame."""
    top = scored.nlargest(k, "score")
    bottom = scored.nsmallest(k, "score")
    return top, bottom


def quantile_examples(scored: pd.DataFrame, n_bins: int = 5, per_bin: int = 2,
                      seed: int = 0) -> pd.DataFrame:
    """``per_bin`` examples from each score quantile (bin 1 = highest scores)."""
    if scored.empty:
        return scored.assign(quantile=pd.Series(dtype="int64"))
    n_bins = max(1, min(n_bins, len(scored)))
    order = scored["score"].rank(method="first", ascending=False).to_numpy()
    bins = np.ceil(order * n_bins / len(scored)).astype(int).clip(1, n_bins)
    rng = np.random.default_rng(seed)
    picks = []
    for b in range(1, n_bins + 1):
        where = np.flatnonzero(bins == b)
        take = rng.choice(where, size=min(per_bin, len(where)), replace=False)
        picks.extend(sorted(take, key=lambda i: order[i]))
    return scored.iloc[picks].assign(quantile=bins[picks])


def filter_examples(scored: pd.DataFrame, labels: Sequence[str] | None = None,
                    text: str = "") -> pd.DataFrame:
    """Rows whose label is in ``labels`` (all when None) and whose prompt or response contains
    ``text`` (case-insensitive, plain substring)."""
    mask = np.ones(len(scored), dtype=bool)
    if labels is not None:
        origin = scored["data_origin"].astype("object").fillna("unlabelled")
        mask &= origin.isin(list(labels)).to_numpy()
    if text:
        needle = text.lower()
        hit = (scored["prompt"].str.lower().str.contains(needle, regex=False, na=False)
               | scored["response"].str.lower().str.contains(needle, regex=False, na=False))
        mask &= hit.to_numpy()
    return scored[mask]


def histogram_by_label(scores: np.ndarray, labels: Sequence[str | None],
                       n_bins: int = 40) -> pd.DataFrame:
    """Counts per (score bin, label) — pre-binned so 100k scores draw as a few dozen bars.

    Returns ``label, bin_left, bin_right, bin_mid, count``.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(["unlabelled" if x is None else str(x) for x in labels], dtype=object)
    if scores.size == 0:
        return pd.DataFrame(columns=["label", "bin_left", "bin_right", "bin_mid", "count"])
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, n_bins + 1)
    rows = []
    for label in sorted(set(labels)):
        counts, _ = np.histogram(scores[labels == label], bins=edges)
        rows.append(pd.DataFrame({"label": label, "bin_left": edges[:-1], "bin_right": edges[1:],
                                  "bin_mid": (edges[:-1] + edges[1:]) / 2, "count": counts}))
    return pd.concat(rows, ignore_index=True)


def compare_ranks(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Join two runs' ``idx, score`` on idx: ranks (1 = top), rank percentiles and their gap.

    ``rank_gap`` > 0 means run *a* ranks the example higher than run *b*.
    """
    merged = a[["idx", "score"]].merge(b[["idx", "score"]], on="idx", suffixes=("_a", "_b"))
    n = max(len(merged), 1)
    rank_a = merged["score_a"].rank(ascending=False, method="min")
    rank_b = merged["score_b"].rank(ascending=False, method="min")
    return merged.assign(rank_a=rank_a.astype(int), rank_b=rank_b.astype(int),
                         pct_a=100.0 * (rank_a - 1) / n, pct_b=100.0 * (rank_b - 1) / n,
                         rank_gap=(rank_b - rank_a).astype(int))


def thin_for_scatter(frame: pd.DataFrame, max_points: int = 5000, seed: int = 0) -> pd.DataFrame:
    """A random subset of at most ``max_points`` rows so big scatters stay responsive."""
    if len(frame) <= max_points:
        return frame
    return frame.sample(n=max_points, random_state=seed)


# ---------------------------------------------------------------- agreement and retrieval

def score_matrix(score_frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Columns = runs (keyed by name), rows = example idx present in every run."""
    series = [f.set_index("idx")["score"].rename(name) for name, f in score_frames.items()]
    if not series:
        return pd.DataFrame()
    return pd.concat(series, axis=1, join="inner").sort_index()


def correlation_frame(matrix: pd.DataFrame, kind: str = "pearson") -> pd.DataFrame:
    """Pearson or Spearman correlation between the columns of ``score_matrix`` (engine metric)."""
    from .experiments.metrics import correlation_matrix

    corr = correlation_matrix({c: matrix[c].to_numpy() for c in matrix.columns}, kind=kind)
    return pd.DataFrame(corr).loc[list(matrix.columns), list(matrix.columns)]


# ---------------------------------------------------------------- SAE features (Fig. 4)

def feature_influence(attributions: pd.DataFrame, top_n: int = 15,
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


# ---------------------------------------------------------------- filter and retrain (Fig. 2)

# The retrain grid's reference cells (experiments/retrain.py): the base model (everything removed)
# and "all" (retrained on everything, 0% removed; the start of every curve).
BASE_METHOD, ALL_METHOD = "base", "all"
REFERENCE_METHODS = (BASE_METHOD, ALL_METHOD)


def retrain_curves(cells: pd.DataFrame, value: str = "trait_score") -> pd.DataFrame:
    """Mean ± SEM of ``value`` per method, mode and fraction over seeds.

    The "all" cells (0% removed) are every curve's starting point, so they are copied into each
    (method, mode). Returns ``experiment_id, trait, method, mode, fraction, mean, sem, n``.
    """
    cols = ["experiment_id", "trait", "method", "mode", "fraction", "mean", "sem", "n"]
    if cells is None or cells.empty:
        return pd.DataFrame(columns=cols)
    ok = cells[(cells["status"].fillna("complete") == "complete") & cells[value].notna()]
    start = ok[ok["method"] == ALL_METHOD]
    rest = ok[~ok["method"].isin(REFERENCE_METHODS)]
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
    for method, name in ((BASE_METHOD, "base model"), (ALL_METHOD, "fine-tuned on all data")):
        part = good[good["method"] == method]
        if not part.empty:
            out[name] = float(part[value].mean())
    return out


# ---------------------------------------------------------------- cost

def method_costs(table: pd.DataFrame) -> pd.DataFrame:
    """Median wall time and throughput of complete runs per method, with the slowdown relative
    to the fastest concept-based method. Returns ``method, runs, wall_s, examples_per_s``."""
    cols = ["method", "method_label", "runs", "wall_s", "examples_per_s", "s_per_1k_examples"]
    if table is None or table.empty:
        return pd.DataFrame(columns=cols)
    done = table[(table["status"] == "complete") & table["wall_s"].notna()]
    if done.empty:
        return pd.DataFrame(columns=cols)
    g = done.groupby("method").agg(runs=("run_id", "count"), wall_s=("wall_s", "median"),
                                   examples_per_s=("examples_per_s", "median"),
                                   n_total=("n_total", "median")).reset_index()
    g["s_per_1k_examples"] = 1000.0 * g["wall_s"] / g["n_total"].clip(lower=1)
    g["method_label"] = [method_label(m) for m in g["method"]]
    g = g.assign(_o=[method_sort_key(m) for m in g["method"]]).sort_values("_o")
    return g[cols].reset_index(drop=True)


def speedups(costs: pd.DataFrame, pairs: Sequence[tuple[str, str]] = (
        ("influence_function", "vector_filter"), ("concept_influence", "vector_filter"),
        ("influence_function", "projection_difference"),
        ("concept_influence", "projection_difference"),
        ("influence_function", "concept_influence"))) -> pd.DataFrame:
    """``slow / fast`` time-per-example ratios for the method pairs present."""
    per = dict(zip(costs["method"], costs["s_per_1k_examples"])) if not costs.empty else {}
    rows = [{"pair": f"{method_short(s)} / {method_short(f)}", "slow": s, "fast": f,
             "speedup": per[s] / per[f]}
            for s, f in pairs if s in per and f in per and per[f] > 0]
    return pd.DataFrame(rows, columns=["pair", "slow", "fast", "speedup"])


def timing_breakdown(table: pd.DataFrame) -> pd.DataFrame:
    """Long frame ``run, method, stage, seconds`` from the runs' ``timings`` dicts."""
    rows = []
    for _, r in table.iterrows():
        for stage, secs in (r["timings"] or {}).items():
            if isinstance(secs, (int, float)) and not isinstance(secs, bool):
                rows.append({"run": r["label"], "method": r["method"], "stage": stage,
                             "seconds": float(secs)})
    return pd.DataFrame(rows, columns=["run", "method", "stage", "seconds"])


# ---------------------------------------------------------------- concepts

def layer_norms(all_layers) -> pd.DataFrame:
    """``layer, norm`` of a concept's per-layer tensor ``[n_layers(+1), d_model]``."""
    arr = np.asarray(all_layers, dtype=float)
    if arr.ndim != 2:
        return pd.DataFrame(columns=["layer", "norm"])
    return pd.DataFrame({"layer": np.arange(arr.shape[0]), "norm": np.linalg.norm(arr, axis=1)})


def cosine_matrix(vectors: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Cosine similarity between concept directions of the same size (others are dropped)."""
    items = [(k, np.asarray(v, dtype=float).ravel()) for k, v in vectors.items()]
    if not items:
        return pd.DataFrame()
    size = pd.Series([v.size for _, v in items]).mode()[0]
    items = [(k, v) for k, v in items if v.size == size and np.linalg.norm(v) > 0]
    names = [k for k, _ in items]
    mat = np.stack([v / np.linalg.norm(v) for _, v in items]) if items else np.zeros((0, size))
    return pd.DataFrame(mat @ mat.T, index=names, columns=names)


# ---------------------------------------------------------------- token highlighting

def token_highlight_html(tokens: Sequence[str], values: Sequence[float],
                         scale: float | None = None) -> str:
    """HTML for a response with each token's background coloured by its projection on the
    concept: red for positive (towards the concept), blue for negative, opacity ∝ |value|/scale.
    Token text is escaped; the value shows as a tooltip."""
    vals = np.asarray(values, dtype=float)
    if scale is None:
        scale = float(np.abs(vals).max()) if vals.size else 1.0
    scale = scale if scale > 0 else 1.0
    spans = []
    for tok, v in zip(tokens, vals):
        alpha = min(abs(v) / scale, 1.0) * 0.85
        rgb = "213,94,0" if v >= 0 else "0,114,178"
        text = html.escape(tok).replace("\n", "<br>")
        spans.append(f'<span title="{v:+.3f}" style="background: rgba({rgb},{alpha:.2f}); '
                     f'border-radius: 3px; padding: 0 1px">{text}</span>')
    return ('<div style="line-height: 1.9; font-family: ui-monospace, monospace; '
            'white-space: pre-wrap">' + "".join(spans) + "</div>")


# ---------------------------------------------------------------- workspace

def store_version(workspace: str | Path) -> str:
    """A key that changes whenever the store file changes (cache key for the app's reads)."""
    base = Path(workspace) / paths.STORE_FILE
    parts = []
    for p in (base, base.with_name(base.name + ".wal")):
        try:
            st = p.stat()
        except OSError:
            continue
        parts.append(f"{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


@dataclass(frozen=True)
class WorkspaceInfo:
    path: str
    exists: bool


def workspace_info(workspace: str | Path) -> WorkspaceInfo:
    path = Path(workspace).expanduser()
    return WorkspaceInfo(str(path.resolve()), (path / paths.STORE_FILE).exists())


def demo_summary_text(meta_value: Mapping | None) -> str:
    """One line about the demo world from its meta entry (``{"summary": {...}}`` or the summary)."""
    if not meta_value:
        return ""
    summary = meta_value.get("summary", meta_value)
    parts = []
    if "quick" in summary:
        parts.append("quick world" if summary["quick"] else "full world")
    sizes = summary.get("sizes") or {}
    if "finetune" in sizes:
        parts.append(f"{sizes['finetune']} fine-tuning examples")
    labels = sizes.get("finetune_labels") or {}
    if labels:
        parts.append("labels " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    if "n_layers" in summary and "hidden_size" in summary:
        parts.append(f"model {summary['n_layers']} layers × {summary['hidden_size']} d")
    if "concept_layer" in summary:
        parts.append(f"concept layer {summary['concept_layer']}")
    if "build_seconds" in summary:
        parts.append(f"built in {fmt_seconds(summary['build_seconds'])}")
    return " · ".join(parts)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def newest_with_role(table: pd.DataFrame, role: str) -> int:
    """Row position of the newest row of ``table`` (oldest first, with a ``role`` column) whose role
    is ``role``; the last row when none has it. The default choice of a form's picker."""
    if table.empty:
        return 0
    hits = [i for i, r in enumerate(table["role"]) if r == role] if "role" in table else []
    return hits[-1] if hits else len(table) - 1


# ---------------------------------------------------------------- SAE feature search

def feature_trait_share(top: pd.DataFrame, trait_label: str | None) -> float:
    """Share of the top features' influence from ``trait_label`` data, as the CLI reports it
    (``concepts.features.trait_share``: Σ_j F_j^trait / Σ_j Σ_g |F_j^g|).

    ``top``: long ``feature, grp, influence`` rows of the shown features (``feature_influence``).
    NaN when the trait group is absent or every influence is zero.
    """
    from .concepts.features import trait_share

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

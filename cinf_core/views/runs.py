"""Scoring runs as the app shows them: the runs table, the latest run per method, and what each
method costs (wall time, throughput, speed-ups, time per stage)."""
from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Sequence

import pandas as pd

from ..methods.registry import method_key, method_label, method_short, method_sort_key


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


def trait_choices(scored: Iterable[str], other: Iterable[str] = ()) -> list[str]:
    """A trait picker's options: the traits of complete runs (sorted), then the ``other``
    traits no run has scored (e.g. those with test queries, sorted), so the default stays a
    scored trait."""
    done = sorted({t for t in scored if isinstance(t, str)})
    return done + sorted({t for t in other if isinstance(t, str)} - set(done))


def training_datasets(datasets: pd.DataFrame) -> pd.DataFrame:
    """The datasets a scope is picked from before any run exists: those with role ``train``,
    newest first (every dataset, newest first, when none has that role)."""
    if datasets is None or datasets.empty:
        return pd.DataFrame(columns=["dataset_id", "name", "role"])
    train = datasets[datasets["role"] == "train"] if "role" in datasets else datasets.iloc[0:0]
    chosen = train if not train.empty else datasets
    if "created_at" in chosen:
        chosen = chosen.sort_values("created_at", ascending=False, kind="stable")
    else:
        chosen = chosen.iloc[::-1]
    return chosen.reset_index(drop=True)


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

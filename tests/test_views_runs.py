"""The runs table, the latest run per method, and method costs."""
import json

import pandas as pd
import pytest

from cinf_core.methods.registry import get_method
from cinf_core.views.runs import (latest_complete_runs, method_costs, runs_table, speedups,
                                  timing_breakdown, trait_choices, training_datasets)


def _runs():
    return pd.DataFrame({
        "run_id": ["r1", "r2", "r3"],
        "method": ["vector_filter", "concept_influence", "vector_filter"],
        "dataset_id": ["d"] * 3, "model_id": ["m"] * 3, "concept_id": ["c", "c", None],
        "config": [json.dumps({"trait": "evil"}), json.dumps({"trait": "evil"}), "{}"],
        "status": ["complete", "complete", "failed"], "n_total": [10, 10, 10],
        "n_done": [10, 10, 3],
        "started_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"]),
        "finished_at": pd.NaT, "wall_s": [1.0, 50.0, None], "examples_per_s": [10.0, 0.2, None],
        "host": "h", "timings": [json.dumps({"forward": 1.0}), None, None], "error": None})


def test_runs_table_names_and_traits():
    concepts = pd.DataFrame({"concept_id": ["c"], "name": ["persona-evil"]})
    datasets = pd.DataFrame({"dataset_id": ["d"], "name": ["train"]})
    table = runs_table(_runs(), concepts, datasets)
    assert list(table["method"]) == ["concept_influence", "vector_filter", "vector_filter"]
    assert table.loc[table["run_id"] == "r3", "trait"].item() == "—"
    assert set(table["dataset"]) == {"train"}
    latest = latest_complete_runs(table, "evil", "d")
    assert list(latest["run_id"]) == ["r2", "r1"]
    assert runs_table(pd.DataFrame()).empty


def test_training_datasets_newest_first_else_every_dataset():
    datasets = pd.DataFrame({
        "dataset_id": ["a", "b", "c", "d"], "name": ["old-train", "eval", "new-train", "probe"],
        "role": ["train", "eval", "train", "labelled"],
        "created_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"])})
    assert list(training_datasets(datasets)["dataset_id"]) == ["c", "a"]
    others = datasets[datasets["role"] != "train"]
    assert list(training_datasets(others)["dataset_id"]) == ["d", "b"]
    assert training_datasets(pd.DataFrame()).empty


def test_trait_choices_put_the_scored_traits_first():
    assert trait_choices(["evil", "sycophantic", "evil"], ["angry", "evil"]) == [
        "evil", "sycophantic", "angry"]
    assert trait_choices(pd.Series([], dtype=object), ["b", "a"]) == ["a", "b"]
    assert trait_choices(["evil"]) == ["evil"]


def test_answer_start_concept_influence_is_its_own_entry():
    runs = _runs()
    extra = runs.iloc[[1]].assign(run_id="r4", config=json.dumps({"trait": "evil", "concept_window": 3}),
                                  started_at=pd.Timestamp("2026-01-04"))
    table = runs_table(pd.concat([runs, extra], ignore_index=True))
    row = table[table["run_id"] == "r4"].iloc[0]
    assert row["method"] == "concept_influence@start3"
    found = get_method(row["method"])
    assert (found.name, found.options) == ("concept_influence", {"concept_window": 3})
    assert row["method_label"] == "Concept Influence (answer start, 3 tok)"
    assert row["label"].startswith("Concept Influence (answer start, 3 tok) · evil")
    # both Concept Influence runs stay in the scope, the plain one first
    latest = latest_complete_runs(table, "evil", "d")
    assert list(latest["run_id"]) == ["r2", "r4", "r1"]


def test_costs_and_speedups():
    table = runs_table(_runs())
    costs = method_costs(table)
    assert set(costs["method"]) == {"vector_filter", "concept_influence"}
    ratio = speedups(costs)
    assert ratio.loc[ratio["pair"] == "CI / VF", "speedup"].item() == pytest.approx(50.0)
    stages = timing_breakdown(table)
    assert list(stages["stage"]) == ["forward"]

"""Which stored runs the evaluation and the results job read: one per method key."""
import numpy as np

from cinf_core.experiments.evaluate import evaluate, latest_runs, result_methods
from cinf_core.store import Store
from workspace_fixture import _add_run, make_examples


def test_answer_start_concept_influence_is_evaluated_beside_the_plain_one(tmp_path):
    store = Store(tmp_path / "ws")
    data = make_examples(40, 8)
    dataset_id = store.add_dataset("train", data)
    labels = np.array([ex.label == "evil" for ex in data.examples], dtype=float)
    plain = _add_run(store, "concept_influence", dataset_id, "m", "c", "evil", -labels)
    window = _add_run(store, "concept_influence", dataset_id, "m", "c", "evil", labels,
                      extra={"concept_window": 3})
    assert latest_runs(store, "evil") == {"concept_influence": plain, "concept_influence@start3": window}
    auc = evaluate(tmp_path / "ws", ["evil"])["auc_pr"]["evil"]
    assert auc["concept_influence@start3"] == 1.0 and auc["concept_influence"] < 0.6
    assert "concept_influence@start3" in result_methods() and "concept_influence" in result_methods()

"""Which stored runs the evaluation and the results job read: one per method key."""
import numpy as np
import pytest

from cinf_core.experiments.evaluate import ensure_runs, evaluate, latest_runs, result_methods
from cinf_core.methods.registry import method_keys
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


def test_the_results_job_retrains_the_grid_it_is_given(tmp_path, monkeypatch):
    """After the scores and the evaluation, compute_results runs one filter-and-retrain grid per
    trait (the issue's small grid by default, a smaller one when a test asks, none with None)."""
    from cinf_core.experiments import evaluate as ev
    from cinf_core.experiments.retrain import RetrainConfig, _grid, results_grid

    grid = results_grid("evil")
    assert set(grid.methods) == {"concept_influence", "vector_filter", "influence_function",
                                 "random"}
    assert (grid.modes, grid.fractions, grid.seeds) == (("most",), (0.25, 0.5), (0, 1))
    assert len(_grid(grid)) == 19  # the base model, "all" per seed, 4 methods x 2 fractions x 2

    ran = []
    monkeypatch.setattr(ev, "ensure_runs", lambda ws, progress=None: {"evil": {}, "syco": {}})
    monkeypatch.setattr(ev, "evaluate", lambda ws: {"auc_pr": {}})
    monkeypatch.setattr(ev, "retrain_unavailable", lambda store: None)
    monkeypatch.setattr(ev, "run_grid", lambda ws, cfg, progress, workers: ran.append(
        (cfg.trait, cfg.methods, workers)) or {"n_cells_complete": 3})
    small = lambda trait: RetrainConfig(trait=trait, methods=("random",), modes=("most",),
                                        fractions=(0.5,), seeds=(0,))
    out = ev.compute_results(tmp_path, retrain_grid=small, workers=2)
    assert ran == [("evil", ("random",), 2), ("syco", ("random",), 2)]
    assert out["retrain"]["evil"] == {"n_cells_complete": 3}
    assert Store(tmp_path).get_meta("evaluation") == {"auc_pr": {}, "figure4": {}}
    assert ev.compute_results(tmp_path, retrain_grid=None)["retrain"] == {
        "skipped": "no grid asked for"}
    monkeypatch.setattr(ev, "retrain_unavailable", lambda store: "no judge")
    assert ev.compute_results(tmp_path)["retrain"] == {"skipped": "no judge"}


def test_the_scoring_stage_says_which_run_of_the_job_it_is(tmp_path, monkeypatch):
    """Each run's progress names the method, the trait and how many runs the job has."""
    from cinf_core.methods import runner

    store = Store(tmp_path / "ws")
    store.add_dataset("train", make_examples(10, 2))
    store.add_test_queries("evil", "m", [{"messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}]}])
    seen = []

    def fake_score(ws, cfg, progress=None):
        progress("score " + cfg.method, 0.5)
        return {"run_id": cfg.method}

    monkeypatch.setattr(runner, "score", fake_score)
    runs = ensure_runs(tmp_path / "ws", methods=("random", "vector_filter"),
                       progress=lambda stage, f: seen.append(stage))
    assert runs == {"evil": {"random": "random", "vector_filter": "vector_filter"}}
    assert seen == ["Random for evil (1 of 2) · score random",
                    "Vector Filter for evil (2 of 2) · score vector_filter"]


@pytest.mark.slow
def test_what_the_results_job_still_has_to_compute(quick_world):
    """A fresh demo world: every method's run and every cell of the small grid, per trait."""
    from cinf_core.experiments.evaluate import results_missing

    n = len(result_methods())
    assert results_missing(Store(quick_world)) == [
        f"evil: {n} scoring runs", "evil: 19 retrain cells",
        f"sycophantic: {n} scoring runs", "sycophantic: 19 retrain cells"]
    assert results_missing(Store(quick_world), retrain_grid=None) == [
        f"evil: {n} scoring runs", f"sycophantic: {n} scoring runs"]


def test_signed_methods_get_the_two_sidedness_diagnostic(tmp_path, capsys):
    """The registry says which methods are signed (Random and Lexical are not); the evaluation
    reads both ends of each signed run, and the CLI prints them."""
    from cinf_core.cli import _say_auc_pr
    from cinf_core.experiments.metrics import two_sidedness
    from cinf_core.methods.registry import is_signed, method_keys

    assert {k for k in method_keys() if not is_signed(k)} == {"lexical", "random"}
    assert is_signed("concept_influence@start3") and not is_signed("no_such_method")
    store = Store(tmp_path / "ws")
    data = make_examples(40, 8)
    dataset_id = store.add_dataset("train", data)
    labels = np.array([ex.label == "evil" for ex in data.examples])
    rng = np.random.default_rng(0)
    ends = np.where(labels, np.where(np.arange(40) % 2 == 0, 5.0, -5.0), rng.uniform(-1, 1, 40))
    for method, scores in (("concept_influence", ends), ("vector_filter", labels * 3.0),
                           ("random", rng.normal(size=40)), ("lexical", labels * 1.0)):
        _add_run(store, method, dataset_id, "m", None if method == "random" else "c", "evil",
                 scores)
    result = evaluate(tmp_path / "ws", ["evil"])
    both = result["two_sided"]["evil"]
    assert set(both) == {"concept_influence", "vector_filter"}
    assert both["concept_influence"] == pytest.approx(two_sidedness(ends, labels))
    assert both["concept_influence"]["auc_pr_abs"] == pytest.approx(1.0)
    assert both["concept_influence"]["auc_pr"] < 0.8
    assert both["vector_filter"]["bottom_recall"] == 0.0
    _say_auc_pr(result)
    err = capsys.readouterr().err
    assert "Both ends for evil" in err
    line = [ln for ln in err.splitlines() if ln.strip().startswith("concept_influence ")][-1]
    assert f"{both['concept_influence']['top_recall']:.1%}" in line and "1.000" in line


def test_results_status_counts_the_default_grid_beside_a_worlds_own(tmp_path, tiny_model_dir):
    """A workspace that ran its own grid (Remove Most 50% only, as the SmolLM2 world did) lacks
    the default grid's 25% cells only; a trait without cells lacks all 19; scored methods are
    listed by key, the rest named as unscored; cells of an unfinished claim do not count."""
    from cinf_core.data import ChatDataset, ChatExample
    from cinf_core.experiments.evaluate import results_missing, results_status
    from cinf_core.experiments.retrain import (RetrainConfig, _grid, environment, experiment_id,
                                               results_grid)
    from cinf_core.models import ModelSpec
    from conftest import chat

    store = Store(tmp_path / "ws")
    def rows(kind: str, n: int = 4) -> ChatDataset:
        return ChatDataset([ChatExample(chat(f"{kind} question {i}?", f"answer {i}."))
                            for i in range(n)])

    train = store.add_dataset("train", rows("train"), role="train")
    store.add_dataset("heldout", rows("heldout"), role="heldout")
    store.add_dataset("capability", rows("capability"), role="capability")
    store.add_model("base", ModelSpec(path=str(tiny_model_dir)), role="base")
    store.set_meta("retrain", {"lora": {"r": 4, "alpha": 8}})
    query = [{"messages": chat("q", "a")}]
    for trait in ("evil", "sycophantic"):
        store.add_test_queries(trait, "m", query)
    assert results_status(store)["retrain_unavailable"] is not None  # no judge yet
    assert all(p["grid_missing"] == 0 for p in results_status(store)["traits"].values())
    store.set_meta("judge", {"kind": "classifier", "path": "x"})

    for method in ("random", "vector_filter"):
        _add_run(store, method, train, "m", "c", "evil", np.arange(4.0))
    exp = experiment_id(store, results_grid("evil"), environment(store))
    own = RetrainConfig(trait="evil", methods=results_grid("evil").methods, modes=("most",),
                        fractions=(0.5,), seeds=(0, 1))
    for cell in _grid(own):
        store.add_retrain_cell(exp, {**cell, "trait_score": 20.0})
    store.claim_retrain_cell(exp, {"method": "random", "mode": "most", "fraction": 0.25,
                                   "seed": 0, "trait": "evil"}, owner="elsewhere:1")

    status = results_status(store)
    n = len(result_methods())
    assert status["retrain_unavailable"] is None and status["sae"] is False
    assert status["grid"] == {"methods": list(results_grid("evil").methods), "modes": ["most"],
                              "fractions": [0.25, 0.5], "seeds": [0, 1], "cells": 19}
    evil, syco = status["traits"]["evil"], status["traits"]["sycophantic"]
    assert evil["scored"] == [k for k in method_keys() if k in ("random", "vector_filter")]
    assert set(evil["unscored"]) == set(result_methods()) - {"random", "vector_filter"}
    assert (evil["grid_missing"], syco["grid_missing"]) == (8, 19)
    assert syco["scored"] == [] and syco["unscored"] == result_methods()
    assert results_missing(store) == [f"evil: {n - 2} scoring runs", "evil: 8 retrain cells",
                                      f"sycophantic: {n} scoring runs",
                                      "sycophantic: 19 retrain cells"]
    assert results_status(store, retrain_grid=None)["grid"] is None

"""What the Overview says about a workspace's results and what it offers to compute."""
import pandas as pd

from cinf_core.experiments.evaluate import result_methods
from cinf_core.experiments.retrain import RetrainConfig, _grid, results_grid
from cinf_core.methods.registry import method_keys, method_label
from cinf_core.jobs import KILLED_ERROR, STALE_ERROR
from cinf_core.views.results import OpenAction, results_offer, results_on_open

ALL = method_keys()
GRID = {"methods": ["concept_influence", "vector_filter", "influence_function", "random"],
        "modes": ["most"], "fractions": [0.25, 0.5], "seeds": [0, 1], "cells": 19}


def _status(scored: dict, grid_missing: dict, why=None, sae=True) -> dict:
    return {"traits": {t: {"scored": [k for k in ALL if k in keys],
                           "unscored": [k for k in result_methods() if k not in keys],
                           "grid_missing": grid_missing[t]} for t, keys in scored.items()},
            "grid": GRID, "retrain_unavailable": why, "sae": sae}


def _cells(trait: str, fractions=(0.5,), status="complete", experiment="e1") -> pd.DataFrame:
    cfg = RetrainConfig(trait=trait, methods=tuple(GRID["methods"]), modes=("most",),
                        fractions=fractions, seeds=(0, 1))
    return pd.DataFrame([{**c, "experiment_id": experiment, "trait_score": 25.0,
                          "status": status} for c in _grid(cfg)])


def test_a_fresh_world_is_offered_the_results():
    offer = results_offer(_status({"evil": [], "sycophantic": []},
                                  {"evil": 19, "sycophantic": 19}), pd.DataFrame())
    n = len(result_methods())
    assert offer.fresh and offer.have is None and offer.button == "Compute the results"
    assert offer.todo.startswith(f"Not computed yet: evil: {n} scoring runs; evil: 19 retrain "
                                 f"cells; sycophantic: {n} scoring runs; sycophantic: 19 retrain")
    # claimed cells that never finished are not results
    running = _cells("evil", status="running")
    assert results_offer(_status({"evil": []}, {"evil": 19}), running).fresh


def test_a_completed_world_with_its_own_grid_is_offered_only_the_rest():
    """The SmolLM2 world: every method scored for both traits, 11 cells of its own grid (Remove
    Most 50%, seeds 0 and 1) for evil only; the default grid adds the 25% cells for evil and
    everything for sycophantic."""
    status = _status({"evil": ALL, "sycophantic": ALL}, {"evil": 8, "sycophantic": 19})
    offer = results_offer(status, _cells("evil"))
    assert not offer.fresh
    assert offer.button == "Compute the rest of the default grid: 27 more retrain cells"
    labels = ", ".join(method_label(k) for k in ALL)
    assert offer.have.startswith(f"**Scored:** all {len(ALL)} methods for evil and sycophantic "
                                 f"({labels}).")
    assert ("**Filter and retrain:** 11 cells for evil (Remove Most 50% by Concept Influence, "
            "Influence Function, Vector Filter and Random; seeds 0 and 1; with the base model "
            "and the model fine-tuned on all data); none for sycophantic.") in offer.have
    assert "Not computed" not in offer.have + offer.todo
    assert "still lacks 8 cells for evil and 19 cells for sycophantic" in offer.todo
    assert "(Remove Most 25% and 50% by" in offer.todo and "19 cells a trait" in offer.todo
    assert "SAE feature views" in offer.todo
    assert "SAE" not in results_offer({**status, "sae": False}, _cells("evil")).todo


def test_missing_runs_are_named_and_counted_with_the_cells():
    status = _status({"evil": ["random", "vector_filter"]}, {"evil": 19})
    offer = results_offer(status, pd.DataFrame())
    rest = len(result_methods()) - 2
    assert not offer.fresh
    assert offer.button == (f"Compute the rest of the results: {rest} more scoring runs and "
                            "19 more retrain cells")
    assert (f"**Scored:** evil: 2 of {len(result_methods())} methods (Vector Filter, Random)."
            in offer.have)
    assert "**Filter and retrain:** no cells yet." in offer.have
    assert "Not scored yet: evil by " in offer.todo
    assert method_label("influence_function") in offer.todo
    only_runs = results_offer(_status({"evil": ["random"]}, {"evil": 0}), _cells("evil"))
    assert only_runs.button == (f"Compute the rest of the results: {rest + 1} more scoring runs")


def test_nothing_is_offered_when_everything_is_there_or_retraining_is_impossible():
    done = _cells("evil", fractions=(0.25, 0.5))
    offer = results_offer(_status({"evil": ALL}, {"evil": 0}), done)
    assert offer.button is None and offer.todo is None and not offer.fresh
    assert "19 cells for evil (Remove Most 25% and 50% by" in offer.have
    two = pd.concat([done, _cells("evil", experiment="e2").iloc[:1]])
    assert "20 cells for evil (" in results_offer(_status({"evil": ALL}, {"evil": 0}), two).have
    assert "; 2 experiments)" in results_offer(_status({"evil": ALL}, {"evil": 0}), two).have
    cannot = results_offer(_status({"evil": ALL}, {"evil": 0}, why="no judge"), pd.DataFrame())
    assert cannot.button is None
    assert "**Filter and retrain:** not available here (no judge)." in cannot.have
    no_trait = results_offer({"traits": {}, "grid": None, "retrain_unavailable": None,
                              "sae": False}, _cells("evil"))
    assert no_trait.have.startswith("**Filter and retrain:** 11 cells for evil (")
    assert no_trait.button is None and "Scored" not in no_trait.have
    nothing = results_offer({"traits": {}, "grid": None, "retrain_unavailable": None,
                             "sae": False}, None)
    assert nothing == type(nothing)(None, None, None, fresh=True)


def test_the_default_grid_here_is_the_results_jobs():
    """The grid the tests describe is the one the results job runs."""
    cfg = results_grid("evil")
    assert (list(cfg.methods), list(cfg.modes), list(cfg.fractions), list(cfg.seeds),
            len(_grid(cfg))) == tuple(GRID.values())


# ---------------------------------------------------------------- the app command's results job

def _job(status: str, error: str | None = None, args: dict | None = None, **more) -> dict:
    return {"job_id": "j1", "kind": "results", "status": status, "error": error,
            "args": args or {}, "progress": 0.4, "message": "", **more}


def test_the_app_starts_the_results_job_on_a_fresh_world():
    """The demo's first minutes: nothing computed and no results job ever, so it starts."""
    status = _status({"evil": [], "sycophantic": []}, {"evil": 19, "sycophantic": 19})
    missing = ["evil: 8 scoring runs", "evil: 19 retrain cells"]
    action = results_on_open(missing, status, pd.DataFrame(), [], None)
    assert action.start and action.args == {}
    assert action.line == ("computing in the background (evil: 8 scoring runs, evil: 19 retrain "
                           "cells); the pages fill in as each part is stored (see Overview > "
                           "Background jobs)")


def test_the_app_resumes_an_interrupted_results_job_with_its_args():
    """Its runner vanished (job_state's words) or a signal killed its command: started again
    with the same args, whatever it stored by then."""
    status = _status({"evil": ["random", "vector_filter"]}, {"evil": 19})
    for error in (f"{STALE_ERROR}; see /ws/artifacts/jobs/j1.log", f"{KILLED_ERROR} (SIGKILL)"):
        last = _job("failed", error, args={"workers": 2})
        action = results_on_open(["evil: 6 scoring runs"], status, _cells("evil"), [], last)
        assert action.start and action.args == {"workers": 2}
        assert action.line.startswith("resuming the results job that was interrupted (still "
                                      "to compute: evil: 6 scoring runs; what it stored is kept)")
    # interrupted before it stored anything: resumed too
    fresh = _status({"evil": []}, {"evil": 19})
    assert results_on_open(["evil: 8 scoring runs"], fresh, pd.DataFrame(), [],
                           _job("failed", STALE_ERROR)).start


def test_the_app_leaves_a_world_completed_with_its_own_grid_alone():
    """The SmolLM2 world: every method scored, 11 cells of its own grid; the default grid's 27
    missing cells are hours of retraining, so opening the app only says the Overview offers them."""
    status = _status({"evil": ALL, "sycophantic": ALL}, {"evil": 8, "sycophantic": 19})
    missing = ["evil: 8 retrain cells", "sycophantic: 19 retrain cells"]
    for last in (None, _job("done")):
        action = results_on_open(missing, status, _cells("evil"), [], last)
        assert not action.start
        assert action.line == (
            f"results computed: all {len(ALL)} methods scored for evil and sycophantic, 11 "
            "filter-and-retrain cells for evil; no job started: the Overview offers 'Compute the "
            "rest of the default grid: 27 more retrain cells' (evil: 8 retrain cells, "
            "sycophantic: 19 retrain cells)")


def test_the_app_does_not_restart_a_cancelled_or_failed_results_job():
    """The user stopped it, or it failed with its own error (it would fail again): the line says
    so, even on a world with nothing computed."""
    fresh = _status({"evil": []}, {"evil": 19})
    cancelled = results_on_open(["evil: 8 scoring runs"], fresh, pd.DataFrame(), [],
                                _job("cancelled"))
    assert not cancelled.start
    assert cancelled.line == ("nothing computed yet; the last results job was cancelled, so none "
                              "is started: the Overview offers 'Compute the results' (evil: 8 "
                              "scoring runs)")
    partial = _status({"evil": ["random"]}, {"evil": 19})
    failed = results_on_open(["evil: 7 scoring runs"], partial, None, [],
                             _job("failed", "no judge endpoint"))
    assert not failed.start
    assert failed.line.startswith(f"results computed: evil: 1 of {len(result_methods())} methods "
                                  "scored, no filter-and-retrain cells; the last results job "
                                  "failed (no judge endpoint), so none is started: the Overview "
                                  "offers 'Compute the rest of the results: ")


def test_the_app_starts_nothing_while_a_results_job_runs_or_when_all_is_there():
    status = _status({"evil": []}, {"evil": 19})
    running = results_on_open(["evil: 8 scoring runs"], status, None,
                              [_job("running", message="score vector_filter")], None)
    assert not running.start
    assert running.line.startswith("a results job is already running (40%: score vector_filter)")
    done = results_on_open([], _status({"evil": ALL}, {"evil": 0}),
                           _cells("evil", fractions=(0.25, 0.5)), [], _job("done"))
    assert not done.start
    assert done.line == (f"results computed: all {len(ALL)} methods scored for evil, 19 "
                         "filter-and-retrain cells for evil; nothing left to compute")
    empty = {"traits": {}, "grid": None, "retrain_unavailable": None, "sae": False}
    assert results_on_open([], empty, None, [], None) == OpenAction(False, {}, None)
    cells_only = results_on_open([], empty, _cells("evil"), [], None)
    assert cells_only.line == ("results computed: 11 filter-and-retrain cells for evil; nothing "
                               "left to compute")

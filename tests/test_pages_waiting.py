"""Pages while a background job computes what they show: the job's stage and per cent, never an
empty state that asks the user to start the run already running (AppTest)."""
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cinf_core.store import Store

APP = str(Path(__file__).resolve().parent.parent / "app.py")
STAGE = "Vector Filter for evil (3 of 16) · score vector_filter"
WAITING_PAGES = ["pages/influential_examples.py", "pages/method_agreement.py",
                 "pages/filter_retrain.py", "pages/runs_cost.py"]


def _open(monkeypatch, workspace, page: str) -> AppTest:
    monkeypatch.setenv("CINF_WORKSPACE", str(workspace))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _results_job(workspace, status: str = "running") -> str:
    """A results job row as the app command's job leaves it mid-way (its runner is this test
    process, so the row does not go stale)."""
    store = Store(workspace)
    job_id = store.create_job("results", {})
    store.update_job(job_id, status=status, progress=0.42, message=STAGE, pid=os.getpid())
    return job_id


@pytest.mark.parametrize("page", WAITING_PAGES)
def test_a_page_waiting_for_the_results_job_shows_what_it_computes(monkeypatch, tmp_path, page):
    _results_job(tmp_path)
    at = _open(monkeypatch, tmp_path, page)
    bars = [p.proto.text for p in at.get("progress")]
    assert any(STAGE in text and "(42%)" in text for text in bars), bars
    # The page's own empty state says a job computes it (a form below may still say what it
    # needs, e.g. Runs & cost's scoring form on a workspace without a model).
    assert "computing it now" in at.info[0].value and "Next step" not in at.info[0].value


def test_the_empty_state_returns_when_the_job_has_ended(monkeypatch, tmp_path):
    _results_job(tmp_path, status="done")
    at = _open(monkeypatch, tmp_path, "pages/influential_examples.py")
    assert not at.get("progress")
    assert any("Next step" in i.value for i in at.info)
    assert not any("comes with runs" in i.value for i in at.info)


def test_concepts_wait_for_the_demo_build(monkeypatch, tmp_path):
    store = Store(tmp_path)
    job_id = store.create_job("demo", {"quick": True})
    store.update_job(job_id, status="running", progress=0.3, message="pre-train base model",
                     pid=os.getpid())
    at = _open(monkeypatch, tmp_path, "pages/concepts.py")
    assert any("pre-train base model" in p.proto.text for p in at.get("progress"))
    assert "computing it now" in at.info[0].value


def test_the_overview_offers_the_results_job_only_when_nothing_computes_them(monkeypatch,
                                                                            tmp_path):
    from workspace_fixture import make_examples

    store = Store(tmp_path)
    store.add_dataset("train", make_examples(10, 2))
    store.add_test_queries("evil", "m", [{"messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}]}])
    at = _open(monkeypatch, tmp_path, "pages/overview.py")
    assert any(i.value.startswith("Not computed yet: evil:") for i in at.info)
    assert at.button(key="btn:overview:results").label == "Compute the results"
    job_id = store.create_job("demo", {})  # e.g. the world still building
    store.update_job(job_id, status="running", pid=os.getpid())
    at = _open(monkeypatch, tmp_path, "pages/overview.py")
    assert not any(b.key == "btn:overview:results" for b in at.button)

"""Background jobs: a detached runner keeps the job row up to date."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cinf_core import jobs
from cinf_core.store import Store


def slow_steps(n: int, progress=None) -> dict:
    """A stand-in engine function (run in a child process by the job tests)."""
    for i in range(n):
        time.sleep(0.6)
        progress("steps", (i + 1) / n)
    return {"n": n}


def _wait(store: Store, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.job_state(store, job_id)
        if job["status"] in jobs.FINISHED:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {store.job(job_id)}")


def test_command_argv():
    argv = jobs.command_argv("retrain", {"trait": "evil", "methods": ["a", "b"], "quick": True,
                                         "skip": False, "none": None, "max_cells": 3,
                                         "positional": ["x.jsonl"]})
    assert argv == ["retrain", "x.jsonl", "--trait", "evil", "--methods", "a", "b", "--quick",
                    "--max-cells", "3"]


def test_parse_progress_and_plain_error():
    assert jobs.parse_progress("score: 42%|████      | 00:01") == ("score", 0.42)
    assert jobs.parse_progress("\x1b[Agenerate y': 100%|█| 00:03") == ("generate y'", 1.0)
    assert jobs.parse_progress("hello") is None
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1', "  ^^^^",
             "cinf_core.data.DatasetError: 3 invalid row(s) in f.jsonl", "score:  10%|█ | 00:01"]
    assert jobs.plain_error(lines) == "3 invalid row(s) in f.jsonl"
    assert jobs.plain_error(["error: no dataset named 'x'"]) == "no dataset named 'x'"
    assert jobs.last_json_line('noise\n{"a": 1}\n{"b": 2}\nbye\n') == {"b": 2}


def test_unavailable_kinds_are_refused(tmp_path):
    assert jobs.unavailable_reason("datasets") is None
    assert "unknown job kind" in jobs.unavailable_reason("nope")
    missing = jobs.JobKind("x", "Do X", function="cinf_core.no_such_module:f")
    jobs.JOB_KINDS["test_missing"] = missing
    try:
        reason = jobs.unavailable_reason("test_missing")
        assert "not in this version of cinf" in reason
        with pytest.raises(jobs.JobUnavailable, match="not in this version"):
            jobs.start_job(tmp_path, "test_missing", {})
    finally:
        del jobs.JOB_KINDS["test_missing"]


@pytest.mark.slow
def test_start_job_runs_a_real_command_detached(tmp_path):
    job_id = jobs.start_job(tmp_path, "datasets", {})
    store = Store(tmp_path)
    assert store.job(job_id)["pid"]
    job = _wait(store, job_id)
    assert job["status"] == "done" and job["progress"] == 1.0
    assert job["result"]["command"] == "datasets" and job["result"]["datasets"] == []
    assert jobs.job_log_path(tmp_path, job_id).exists()


@pytest.mark.slow
def test_failing_command_reports_plain_error(tmp_path):
    job_id = jobs.start_job(tmp_path, "add-dataset", {"positional": [str(tmp_path / "nope.jsonl")]})
    job = _wait(Store(tmp_path), job_id)
    assert job["status"] == "failed"
    assert "nope.jsonl" in job["error"] and "Traceback" not in job["error"]


@pytest.mark.slow
def test_function_job_reports_progress_and_result(tmp_path, monkeypatch):
    # The child imports this module by name from the tests folder.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    monkeypatch.setitem(jobs.JOB_KINDS, "test_steps",
                        jobs.JobKind("test_steps", "Steps", function="test_jobs:slow_steps"))
    seen = []
    original = Store.update_job

    def spy(self, job_id, **fields):
        seen.append(fields)
        return original(self, job_id, **fields)

    monkeypatch.setattr(Store, "update_job", spy)
    store = Store(tmp_path)
    job_id = store.create_job("test_steps", {"n": 4})
    assert jobs.run_job(tmp_path, job_id) == 0
    job = store.job(job_id)
    assert job["status"] == "done" and job["result"]["n"] == 4
    partial = [f["progress"] for f in seen if f.get("message") == "steps"]
    assert partial and all(0 <= p <= 1 for p in partial) and max(partial) > 0


def test_stale_job_is_marked_failed(tmp_path):
    store = Store(tmp_path)
    job_id = store.create_job("datasets", {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_job(job_id, status="running", pid=dead.pid)
    job = jobs.job_state(store, job_id, stale_after_s=0.0)
    assert job["status"] == "failed" and "ended without reporting" in job["error"]


def test_cancel_job_stops_its_process_group(tmp_path):
    store = Store(tmp_path)
    job_id = store.create_job("datasets", {})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)
    store.update_job(job_id, status="running", pid=sleeper.pid)
    jobs.cancel_job(tmp_path, job_id)
    assert sleeper.wait(timeout=10) != 0
    assert store.job(job_id)["status"] == "cancelled"
    jobs.cancel_job(tmp_path, job_id)  # a finished job is left alone
    assert store.job(job_id)["status"] == "cancelled"

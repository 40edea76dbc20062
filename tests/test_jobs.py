"""Background jobs: a detached runner keeps the job row up to date."""
import subprocess
import sys
import time

import pytest

from cinf_core import jobs
from cinf_core.store import Store


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
    missing = jobs.JobKind("no-such-command", "Do X")
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


# A stand-in command: progress bars on stderr as the CLI draws them, the summary on stdout.
STEPS = """
import sys, time
from cinf_core.progress import ProgressBar, emit
bar = ProgressBar()
for i in range(4):
    time.sleep(0.6)
    bar("steps", (i + 1) / 4)
bar.close()
emit({"n": 4})
"""


def test_every_job_kind_is_a_subcommand_and_jobs_do_not_import_the_cli():
    from cinf_core import cli
    from cinf_core.commands import SUBCOMMANDS

    assert set(cli.COMMANDS) == set(SUBCOMMANDS)
    assert all(jobs.unavailable_reason(kind) is None for kind in jobs.JOB_KINDS)
    assert {"results", "add-concept"} <= set(jobs.JOB_KINDS)
    code = "import sys, cinf_core.jobs; print('cinf_core.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_job_input_file_is_named_by_its_content(tmp_path):
    a = jobs.job_input_file(tmp_path, "q1\nq2\n")
    assert a.read_text() == "q1\nq2\n" and a.is_absolute()
    assert jobs.job_input_file(tmp_path, "q1\nq2\n") == a
    assert jobs.job_input_file(tmp_path, "other") != a


@pytest.mark.slow
def test_a_job_reports_its_commands_progress_and_result(tmp_path, monkeypatch):
    monkeypatch.setitem(jobs.JOB_KINDS, "test_steps", jobs.JobKind("test_steps", "Steps"))
    monkeypatch.setattr(jobs, "job_argv", lambda kind, args, ws: [sys.executable, "-c", STEPS])
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
    assert jobs.job_interrupted(job) and jobs.job_interrupted(store.job(job_id))


def test_a_job_that_ends_while_it_is_judged_stale_keeps_its_ending(tmp_path, monkeypatch):
    """The runner writes "done" and exits between job_state's read (running, old, its pid then
    gone) and its write: the job stays done, not "failed"; a cancel in the same window leaves
    it done too."""
    store = Store(tmp_path)
    job_id = store.create_job("datasets", {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_job(job_id, status="running", pid=dead.pid)
    seen = store.job(job_id)  # what both read before the runner's last write
    store.update_job(job_id, status="done", progress=1.0, message="done")
    monkeypatch.setattr(Store, "job", lambda self, jid: dict(seen) if jid == job_id else None)
    assert jobs.job_state(store, job_id, stale_after_s=0.0)["status"] == "running"  # its old read
    jobs.cancel_job(tmp_path, job_id)
    monkeypatch.undo()
    job = store.job(job_id)
    assert job["status"] == "done" and job["error"] is None
    assert not store.update_job(job_id, if_status=jobs.ACTIVE, status="failed")
    assert store.update_job(job_id, if_status=("done",), message="still done")


def test_a_command_killed_by_a_signal_is_an_interrupted_job(tmp_path, monkeypatch):
    """A signal (the OOM killer's SIGKILL) ends the command: the row says so, not whatever its
    last stderr line was, and the job counts as interrupted; a job that failed with an error of
    its own, was cancelled or is done does not."""
    killed = ("import os, signal, sys; print('loading the model', file=sys.stderr, flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    monkeypatch.setitem(jobs.JOB_KINDS, "test_killed", jobs.JobKind("test_killed", "Killed"))
    monkeypatch.setattr(jobs, "job_argv", lambda kind, args, ws: [sys.executable, "-c", killed])
    store = Store(tmp_path)
    job_id = store.create_job("test_killed", {})
    assert jobs.run_job(tmp_path, job_id) == -9
    job = store.job(job_id)
    assert job["status"] == "failed" and job["error"] == "the job's command was killed (SIGKILL)"
    assert jobs.job_interrupted(job)
    assert not jobs.job_interrupted({**job, "error": "no judge endpoint"})
    assert not jobs.job_interrupted({**job, "status": "cancelled", "error": None})
    assert not jobs.job_interrupted({**job, "status": "done", "error": None})


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


def test_active_jobs_finds_running_jobs_wherever_they_started(tmp_path):
    """What the pages follow: queued or running jobs of the kinds asked for, newest first; a job
    whose runner is gone is marked failed and left out."""
    import os

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = Store(tmp_path)
    ids = {}
    for kind, status, pid in (("score", "running", os.getpid()), ("results", "done", None),
                              ("results", "running", os.getpid()), ("demo", "running", dead.pid)):
        ids[kind, status] = store.create_job(kind, {})
        store.update_job(ids[kind, status], status=status, pid=pid)
    assert [j["job_id"] for j in jobs.active_jobs(store, ("results",))] == [ids["results", "running"]]
    assert [j["kind"] for j in jobs.active_jobs(store, ("results", "score"))] == ["results", "score"]
    assert [j["kind"] for j in jobs.active_jobs(store, stale_after_s=0.0)] == ["results", "score"]
    assert store.job(ids["demo", "running"])["status"] == "failed"

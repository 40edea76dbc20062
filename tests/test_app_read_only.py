"""Demoing safely: ``python -m cinf_core app --read-only`` (the default on an address other than
loopback) serves the results of the workspace fixed at start: no folder box, no form, upload or
job button on any page, the store opened read-only, job requests refused even when forged; the app
says which mode it is in."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cinf_core import cli, jobs
from cinf_core.store import Store, WorkspaceWriteError
from conftest import store_snapshot, wait_until_serving
from workspace_fixture import build_workspace

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ["pages/overview.py", "pages/influential_examples.py", "pages/concepts.py",
         "pages/sae_features.py", "pages/method_agreement.py", "pages/filter_retrain.py",
         "pages/runs_cost.py"]
SCORE_FORM = "FormSubmitter:rc:score-Prepare scoring run"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    return build_workspace(tmp_path_factory.mktemp("read_only_ws"), model_dir=tiny_model_dir)


def _launch(argv, monkeypatch, capsys) -> tuple[int, dict | None, str]:
    """``app ARGV`` with the server start replaced: exit code, the server's environment, stderr."""
    launched = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: launched.append(env) or 0)
    code = cli.main(["app", "--no-progress", *argv])
    return code, (launched[0] if launched else None), capsys.readouterr().err


@pytest.mark.parametrize("argv,read_only", [
    ([], False), (["--address", "::1"], False), (["--address", "localhost"], False),
    (["--read-only"], True), (["--address", "0.0.0.0"], True),
    (["--address", "demo.example.org"], True), (["--address", "0.0.0.0", "--allow-jobs"], False),
])
def test_the_address_decides_the_mode_and_the_app_says_it(workspace, monkeypatch, capsys, argv,
                                                         read_only):
    monkeypatch.setenv(jobs.READ_ONLY_ENV, "1")  # the app's own setting is not inherited
    code, env, err = _launch([*argv, "--no-demo", "--workspace", str(workspace)], monkeypatch,
                             capsys)
    assert code == 0 and (env.get(jobs.READ_ONLY_ENV) == "1") is read_only
    assert env["CINF_WORKSPACE"] == str(workspace)
    assert ("(read-only: results of" in err) is read_only
    assert ("(jobs allowed: anyone who opens it can start jobs" in err) is not read_only


def test_read_only_needs_a_store_and_no_contradiction(tmp_path, workspace, monkeypatch, capsys):
    code, env, err = _launch(["--read-only", "--allow-jobs", "--workspace", str(workspace)],
                             monkeypatch, capsys)
    assert code == 2 and env is None and "--read-only and --allow-jobs contradict" in err
    empty = tmp_path / "empty"
    code, env, err = _launch(["--address", "0.0.0.0", "--workspace", str(empty)], monkeypatch,
                             capsys)
    assert code == 2 and env is None and f"no store in {empty} to serve read-only" in err
    assert not empty.exists()  # nothing was built or created


def _pages(at: AppTest):
    """Run every page in turn; yields each page's name after its run."""
    at.run()
    for page in PAGES:
        if page != PAGES[0]:
            at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        yield page


def test_no_page_offers_a_form_upload_or_job_when_read_only(workspace, monkeypatch):
    monkeypatch.setenv("CINF_WORKSPACE", str(workspace))
    allowed = AppTest.from_file(APP, default_timeout=120)
    offered = sum(len(allowed.form) + len(allowed.file_uploader) for _ in _pages(allowed))
    assert offered == 10  # what a jobs-allowed app offers here: 8 forms and 2 uploads

    before = store_snapshot(workspace)
    monkeypatch.setenv(jobs.READ_ONLY_ENV, "1")
    at = AppTest.from_file(APP, default_timeout=120)
    for page in _pages(at):
        assert not at.form and not at.file_uploader and not at.button, page
        assert "workspace" not in [t.key for t in at.text_input], page
        if page == PAGES[0]:  # (AppTest keeps the frame's sidebar of the first run only)
            assert any("**Read-only**" in m.value for m in at.sidebar.markdown)
    # the state a submitted scoring form leaves behind, forged: still no button, no job
    at.session_state["rc:args"] = {"method": "vector_filter", "trait": "evil"}
    at.switch_page("pages/runs_cost.py").run()
    assert not at.button and not at.exception
    with pytest.raises(jobs.JobUnavailable, match="serves its workspace read-only"):
        jobs.start_job(workspace, "score", {"method": "vector_filter", "trait": "evil"})
    with pytest.raises(jobs.JobUnavailable, match="--allow-jobs"):
        jobs.cancel_job(workspace, "any-job")
    with pytest.raises(WorkspaceWriteError, match="opened read-only"):
        Store(workspace, read_only=True).set_meta("x", 1)
    assert store_snapshot(workspace) == before  # not a byte written: schema, jobs, meta


# ---------------------------------------------------------------- the real server in Chromium


@pytest.fixture(scope="module")
def forged_ids(workspace):
    """The widget ids a jobs-allowed app gives the Runs & cost scoring form's submit button and,
    once submitted, its "Start scoring" button: what a forged request would trigger."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CINF_WORKSPACE", str(workspace))
        mp.delenv(jobs.READ_ONLY_ENV, raising=False)
        at = AppTest.from_file(APP, default_timeout=120).run()
        at.switch_page("pages/runs_cost.py").run()
        submit = at.button(key=SCORE_FORM)
        ids = [submit.id]
        submit.click().run()
        ids.append(at.button(key="btn:rc:score").id)  # not clicked: it would start the job
    return ids


@pytest.fixture(scope="module")
def read_only_server(workspace, tmp_path_factory):
    """``python -m cinf_core app --read-only`` on a free loopback port: the real command."""
    from test_app_e2e import _free_port

    port = _free_port()
    log = open(tmp_path_factory.mktemp("ro_log") / "app.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cinf_core", "app", "--read-only", "--workspace", str(workspace),
         "--port", str(port), "--no-progress"],
        cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, base, log.name, stop=lambda: os.killpg(proc.pid, signal.SIGKILL))
    yield base
    os.killpg(proc.pid, signal.SIGTERM)  # the command and the server it started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_read_only_server_in_chromium(read_only_server, workspace, forged_ids):
    """Every page in headless Chromium: results, the read-only note, no form, upload, button or
    folder box; then a forged request (the scoring form's submit, then its start button, sent on
    the page's own websocket) starts nothing; the store is unchanged throughout."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from streamlit.proto.BackMsg_pb2 import BackMsg

    from test_app_e2e import CHROMIUM, PAGES as E2E_PAGES, _no_errors, _settle

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    before = store_snapshot(workspace)
    sent, received, server = [], [], {}

    def relay(route):  # the page's websocket, passed through; what the page sends is kept
        upstream = route.connect_to_server()
        server["ws"] = upstream
        route.on_message(lambda m: (sent.append(m), upstream.send(m)))
        upstream.on_message(lambda m: (received.append(m), route.send(m)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.route_web_socket(re.compile(r"/_stcore/stream"), relay)
        try:
            for url_path, title, charts in E2E_PAGES:
                page.goto(f"{read_only_server}/{url_path}", wait_until="domcontentloaded")
                _settle(page, title, charts)
                _no_errors(page)
                for selector in ('[data-testid="stForm"]', '[data-testid="stFileUploader"]',
                                 '[data-testid="stButton"]'):
                    assert page.locator(selector).count() == 0, (url_path, selector)
                assert page.get_by_text("Workspace folder").count() == 0, url_path
                assert page.get_by_text("Read-only").count() == 1, url_path

            page.goto(f"{read_only_server}/runs_cost", wait_until="domcontentloaded")
            _settle(page, "Runs & cost", 2)
            reruns = [m for m in map(_back_msg, sent) if m is not None
                      and m.HasField("rerun_script")]
            for widget_id in forged_ids:
                forged = BackMsg()
                forged.CopyFrom(reruns[-1])
                forged.rerun_script.widget_states.widgets.add(id=widget_id, trigger_value=True)
                answered = len(received)
                server["ws"].send(forged.SerializeToString())
                deadline = time.monotonic() + 30
                while len(received) == answered and time.monotonic() < deadline:
                    page.wait_for_timeout(200)
                assert len(received) > answered, "the server never ran the forged request"
                _settle(page, "Runs & cost", 2)
            page.wait_for_timeout(2000)  # a job would have been recorded by now
            _no_errors(page)
            assert page.get_by_text("Start scoring").count() == 0
        finally:
            page.close()
            browser.close()
    assert store_snapshot(workspace) == before  # no job row, nothing else


def _back_msg(raw):
    from streamlit.proto.BackMsg_pb2 import BackMsg

    if not isinstance(raw, bytes):
        return None
    msg = BackMsg()
    try:
        msg.ParseFromString(raw)
    except Exception:  # noqa: BLE001 — not a BackMsg: the relay also carries other frames
        return None
    return msg
